"""Image tab pipeline: diffusers SD1.5 / SDXL with live previews, Stop, A/B and the token-level controls.

With every control off the diffusers pipeline is called exactly as a user of diffusers would (prompt strings,
generators), so its output is the stock output bit for bit. Controls compose on one ``AttentionControl``
(LPA biases, heatmap and binding recorders) and on the positive ``prompt_embeds`` (leakage fix, ToMe).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import torch

from ..base import (NO_COMPARISON, Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_range,
                    require_text, resolve_seed, with_baseline)
from ..models import ModelSpec, ModelStore, ResolvedModel, keep_placement, peak_memory_mb
from ..outputs import save_png
from ..presets import PresetModels, models_for
from ..streaming import stream_in_thread
from .attention import AttentionControl
from .fast import FastUNet, choose_backend
from .compass import DEFAULT_BOX, PhraseCompassEncoder, apply_compass, load_official_compass, parse_compass_objects
from .binding import BindingConfig, SemanticBinding, grid_layers
from .controls import ControlPlan, binding_report, check_window, split_words
from .heatmaps import overlay
from .lpa import LPAConfig
from .preview import AsyncPreviews, fit_latent_rgb
from .prompts import ParsedPrompt, parse_prompt, token_positions, find_words
from .state import UNetState, unet_state

SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "default": None,
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
TINY_SIZE = 32
MAX_BATCH = 8
MAX_STEPS = 150
# The A side of a same-seed A/B: every control off (the stock pipeline); asked for without a control, there is none.
COMPARISONS = (NO_COMPARISON, "controls off")


@dataclass
class ImageRequest(Request):
    prompt: str = ""
    negative_prompt: str = ""
    model: str = ""
    steps: int = 30
    cfg: float = 7.5
    width: int = 0  # 0 = the model's native size
    height: int = 0
    scheduler: str = "default"
    batch_size: int = 1
    binding: bool = False  # ToMe semantic binding on the [bracketed] or automatically found groups
    ets_step: int = BindingConfig.ets_step  # end-token substitution step (-1 = off, as in the official config)
    lpa: bool = False  # Local Prompt Adaptation
    style: str = ""  # explicit style for LPA ("" = find "in X style" in the prompt)
    lpa_window: tuple[float, float] = LPAConfig.window  # the paper's best, late-only
    isolate: str = ""  # Follow-the-Flow leakage fix: comma-separated items re-encoded alone
    merge_ratio: float = 0.0  # token merging for speed (pipelines/image/merging.py)
    compass: str = ""  # Compass Control objects as JSON: [{"name": "car", "angle": 90, "box": [x0, y0, x1, y1]}]
    compass_encoder: str = "phrase"  # "phrase" (training-free) or a folder with an official/trained encoder
    heatmap_words: str = ""  # comma-separated words whose cross-attention maps are overlaid
    compare: str = NO_COMPARISON  # "controls off": also render the same seed with every control off (A/B)
    preview_every: int = 1  # 0 = no live previews
    fast: bool = True  # captured UNet loop on CUDA (fast.py); eager static path on CPU/ZeroGPU; False = stock call

    def parameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cancel"}

    @property
    def controlled(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate.strip() or self.merge_ratio > 0 or self.compass.strip())


@dataclass
class LoadedImageModel:
    pipe: Any
    arch: str
    preview_map: torch.Tensor

    @property
    def components(self) -> dict[str, Any]:
        return self.pipe.components

    @property
    def state(self) -> UNetState:
        """What the techniques keep for this model's UNet across requests (merging, captured graphs)."""
        return unet_state(self.pipe.unet)


def load_image_model(resolved: ResolvedModel, store: ModelStore) -> LoadedImageModel:
    arch = resolved.spec.kind
    if resolved.source == "tiny":
        from ..tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

        pipe = (tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()).to(store.device, store.dtype)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_pretrained(resolved.location, torch_dtype=store.dtype).to(store.device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedImageModel(pipe, arch, fit_latent_rgb(pipe.vae))


def latent_size(pipe: Any, request: ImageRequest) -> tuple[int, int]:
    return int(request.height) // pipe.vae_scale_factor, int(request.width) // pipe.vae_scale_factor


class ImagePipeline(PresetModels, Pipeline):
    task = "image"
    request_type = ImageRequest
    preview_interval_s = 0.1  # live previews at most this often (AsyncPreviews)

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        self.store = store
        self.preset = preset
        self.specs = models_for("image", preset)
        self._compass_encoders: dict[str, Any] = {}
        self._compass_loras: set[str] = set()  # official compass folders whose LoRA sits on the UNet (adapter "compass")

    def unlisted(self, name: str) -> ModelSpec:
        return ModelSpec(name, "sdxl" if "xl" in name.lower() else "sd15", hub_id=name)

    def load(self, name: str) -> LoadedImageModel:
        return self.store.load(self.spec_for(name), load_image_model)

    def validate(self, request: ImageRequest, spec: ModelSpec) -> None:
        require_text(request.prompt)
        require_range(request.steps, "Steps", 1, MAX_STEPS)
        require_range(request.ets_step, "End-token substitution step", -1, int(request.steps) - 1)
        require_range(request.cfg, "CFG scale", 0.0, 30.0)
        require_range(request.batch_size, "Batch size", 1, MAX_BATCH)
        require_range(request.merge_ratio, "Merge ratio", 0.0, 0.75)
        if request.compare not in COMPARISONS:
            raise PipelineError(f"Unknown comparison {request.compare!r}. Choose one of: {', '.join(COMPARISONS)}.")
        if request.scheduler not in SCHEDULERS:
            raise PipelineError(f"Unknown scheduler {request.scheduler!r}. Choose one of: {', '.join(SCHEDULERS)}.")
        native = TINY_SIZE if spec.tiny else spec.option("size") or DEFAULT_SIZE.get(spec.kind, 512)
        request.width = int(request.width) or native
        request.height = int(request.height) or native
        for name, value in (("Width", request.width), ("Height", request.height)):
            require_range(value, name, 16, 2048)
            if value % 8:
                raise PipelineError(f"{name} must be a multiple of 8, got {value}.")
        check_window(request.lpa_window)
        request.seed = resolve_seed(request.seed)

    def scheduled_pipe(self, model: LoadedImageModel, name: str) -> Any:
        """The loaded pipeline with a fresh scheduler (no scheduler state shared across requests).

        A shallow copy, so the components are the stored ones, untouched: diffusers' ``from_pipe`` casts every
        component to ``torch_dtype or float32``, which turned a bf16 store into fp32 after one request."""
        import diffusers

        base = model.pipe
        choice = SCHEDULERS[name]
        if choice is None:
            scheduler = type(base.scheduler).from_config(base.scheduler.config)
        else:
            cls_name, options = choice
            scheduler = getattr(diffusers, cls_name).from_config(base.scheduler.config, **options)
        pipe = copy.copy(base)
        pipe.scheduler = scheduler
        return pipe

    def generate(self, request: ImageRequest) -> Iterator[Event]:
        spec = self.spec_for(request.model)
        self.validate(request, spec)
        yield Progress(0, int(request.steps), "loading model")
        model = self.load(request.model)
        parsed = parse_prompt(request.prompt, request.style)
        runs = [("baseline", False)] if request.compare != NO_COMPARISON and request.controlled else []
        runs.append(("controlled" if request.controlled else "image", request.controlled))
        outputs: dict[str, dict[str, Any]] = {}
        with keep_placement(model.pipe, spec.name):
            for label, controlled in runs:
                outcome = yield from stream_in_thread(
                    lambda emit, c=controlled, v=label: self.render(model, request, parsed, c, v, emit),
                    request.cancel)
                outputs[label] = outcome
        final = outputs[runs[-1][0]]
        stats: dict[str, Any] = {"model": spec.name, "seed": request.seed, **final["stats"]}
        metadata: dict[str, Any] = {"parameters": request.parameters(), "heatmaps": final["heatmaps"],
                                    "controls": final["controls"]}
        result = Result(final["paths"], stats, metadata)
        if "baseline" in outputs:
            base = outputs["baseline"]
            baseline = Result(base["paths"], base["stats"], {"heatmaps": base["heatmaps"], "controls": base["controls"]})
            result = with_baseline(result, baseline, request.compare)
        yield result

    # ------------------------------------------------------------------------------------------------------
    def render(self, model: LoadedImageModel, request: ImageRequest, parsed: ParsedPrompt, controlled: bool,
               variant: str, emit: Callable[[Event], None]) -> dict[str, Any]:
        """One full generation (baseline or controlled), run on a worker thread; events go through ``emit``."""
        pipe = self.scheduled_pipe(model, request.scheduler)
        device = pipe._execution_device
        steps, batch = int(request.steps), int(request.batch_size)
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(batch)]
        call: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=float(request.cfg),
                                    height=request.height, width=request.width, num_images_per_prompt=batch,
                                    generator=generators, output_type="pil")
        control = AttentionControl(pipe.unet)
        info: dict[str, Any] = {}
        if controlled and request.compass.strip():
            parsed = self.prepare_compass(pipe, request, parsed, control, info)
        self.switch_compass_lora(pipe.unet, controlled and bool(request.compass.strip())
                                 and request.compass_encoder in self._compass_loras)
        heat_tokens = self.heatmap_tokens(pipe, parsed, request)
        heat_layers = grid_layers(pipe.unet, latent_size(pipe, request))
        heat_recorder = control.record(tokens=[p for _, ps in heat_tokens for p in ps],
                                       layers=heat_layers) if heat_tokens else None
        binding = None
        if controlled:
            binding = self.prepare_controls(pipe, model.arch, request, parsed, control, call, generators, info)
        else:
            call.update(prompt=parsed.text, negative_prompt=request.negative_prompt or None)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        merge = None
        backend = choose_backend(device, request.fast, pipe.unet)
        if controlled and request.merge_ratio > 0:
            from .merging import apply_merging, merge_settings

            merge = apply_merging(pipe.unet, float(request.merge_ratio), seed=request.seed,
                                  **merge_settings(model.arch, backend, device))
        fast = FastUNet(pipe.unet, backend, control, lambda: pipe.scheduler.timesteps)
        if binding is not None and backend != "off":
            binding.runner = fast  # the refinement's UNet work on the fast path too (captured forward+backward)
        previews = AsyncPreviews(model.preview_map, upscale=pipe.vae_scale_factor, interval=self.preview_interval_s)

        def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            control.step = fast.step = i + 1
            out: dict[str, Any] = {}
            if binding is not None and i + 1 < steps and binding.wants(i + 1):
                embeds = kwargs["prompt_embeds"]
                half = embeds.shape[0] // 2 if p.do_classifier_free_guidance else 0
                with fast.suspended():
                    latents, positive = binding.refine(i + 1, p.scheduler.timesteps[i + 1], kwargs["latents"],
                                                       embeds[half:])
                out = {"latents": latents, "prompt_embeds": torch.cat([embeds[:half], positive])}
            every = int(request.preview_every)
            if every > 0 and ((i + 1) % every == 0) and i + 1 < steps:
                previews.add(out.get("latents", kwargs["latents"]))
                if (ready := previews.ready()) is not None:
                    emit(Partial(ready, side="A" if variant == "baseline" else ""))
            emit(Progress(i + 1, steps))
            if request.cancel.cancelled:
                p._interrupt = True
            return out

        call.update(callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"] if binding else ["latents"])
        start = time.perf_counter()
        try:
            with control, fast:
                if binding is not None:
                    self.start_binding(pipe, binding, call, generators)
                images = pipe(**call).images
        finally:
            if merge is not None:
                from .merging import merging_stats, remove_merging

                info["tokens_merged"] = merging_stats(pipe.unet)["tokens_merged"]
                remove_merging(pipe.unet)
        elapsed = time.perf_counter() - start
        request.cancel.raise_if_cancelled()
        paths = [str(save_png(image, {**request.parameters(), "seed": request.seed + i, "variant": variant,
                                      "prompt_used": parsed.text, "model": self.spec_for(request.model).name,
                                      "controls": info.get("controls", {})}))
                 for i, image in enumerate(images)]
        heatmaps = self.save_heatmaps(images, heat_recorder, heat_tokens, request, variant)
        stats = {"time_s": round(elapsed, 4), "steps_per_s": round(steps / elapsed, 3) if elapsed > 0 else 0.0,
                 "peak_memory_mb": peak_memory_mb(device), "images": len(images),
                 "tokens_merged": int(info.get("tokens_merged", 0)),
                 "biased_attention_calls": len(control.applied), **fast.stats()}
        if binding is not None:
            stats["binding_groups"] = len(binding.groups)
            stats["binding_refinement_iterations"] = len(binding.history)
            stats["binding_unet_forwards"], stats["binding_unet_backwards"] = (binding.passes["forward"],
                                                                               binding.passes["backward"])
            stats.update(binding.summary())
        return {"paths": paths, "heatmaps": heatmaps, "stats": stats, "controls": info.get("controls", {})}

    def prepare_controls(self, pipe: Any, arch: str, request: ImageRequest, parsed: ParsedPrompt,
                         control: AttentionControl, call: dict[str, Any], generators: list[torch.Generator],
                         info: dict[str, Any]) -> SemanticBinding | None:
        """Encode the prompt ourselves and apply the embedding-level controls; set up the attention-level ones."""
        batch = int(request.batch_size)
        device = pipe._execution_device
        cfg = float(request.cfg) > 1.0
        negative = request.negative_prompt or None
        if arch == "sdxl":
            positive, neg, pooled, neg_pooled = pipe.encode_prompt(
                parsed.text, parsed.text, device=device, num_images_per_prompt=batch,
                do_classifier_free_guidance=cfg, negative_prompt=negative, negative_prompt_2=negative)
            call.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        else:
            positive, neg = pipe.encode_prompt(parsed.text, device, batch, cfg, negative_prompt=negative)
        plan = ControlPlan.from_request(request)
        controls: dict[str, Any] = {}
        positive, where = plan.isolated(pipe, parsed.text, positive)
        if where is not None:
            controls["isolated"] = where
        if plan.lpa is not None:
            controls["lpa"] = plan.route_lpa(control, pipe.tokenizer, parsed)
            if controls["lpa"] is None:
                raise PipelineError("LPA needs a style: write '... in watercolor style' in the prompt or fill the "
                                    "Style field.")
        binding = None
        if plan.binding is not None:
            if not parsed.groups:
                raise PipelineError("Semantic binding found no object+attribute groups. Mark them like "
                                    "'a [red hat] and a [blue car]'.")
            binding = SemanticBinding(pipe, arch, control, parsed, int(request.steps), plan.binding,
                                      generator=torch.Generator("cpu").manual_seed(request.seed),
                                      latent_hw=latent_size(pipe, request), guidance_scale=float(request.cfg))
            controls["binding"] = binding_report(binding.groups)
        # The embeddings already hold one row per image: diffusers would repeat them num_images_per_prompt times
        # again (batch x batch rows for `batch` generators). Image i still gets the noise of seed + i.
        call.update(prompt_embeds=positive, negative_prompt_embeds=neg, num_images_per_prompt=1)
        info.setdefault("controls", {}).update(controls)
        return binding

    def prepare_compass(self, pipe: Any, request: ImageRequest, parsed: ParsedPrompt, control: AttentionControl,
                        info: dict[str, Any]) -> ParsedPrompt:
        """Compass tokens into every text encoder of the pipeline and CALL on ``control``; returns the prompt with
        the placeholders, re-parsed so the other controls' token positions account for them."""
        objects = parse_compass_objects(request.compass)
        if request.binding:
            raise PipelineError("Compass Control and semantic binding cannot be combined yet: turn one of them off.")
        stacks = [(pipe.tokenizer, pipe.text_encoder, self.compass_encoder(request.compass_encoder, pipe))]
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the second encoder gets the phrase encoder
            stacks.append((pipe.tokenizer_2, pipe.text_encoder_2, PhraseCompassEncoder(pipe.text_encoder_2, pipe.tokenizer_2)))
        compass = apply_compass(control, stacks, parsed.text, objects)
        info.setdefault("controls", {})["compass"] = [
            {"name": o.name, "angle": o.angle, "box": list(o.box or DEFAULT_BOX), "tokens": list(pair)}
            for o, pair in zip(objects, compass.pairs)]
        return parse_prompt(compass.text, request.style)

    @staticmethod
    def switch_compass_lora(unet: Any, active: bool) -> None:
        """The official compass LoRA only for runs that use its encoder; every other run sees the stock UNet."""
        if "compass" not in (getattr(unet, "peft_config", None) or {}):
            return
        if active:
            unet.enable_adapters()
        else:
            unet.disable_adapters()

    def compass_encoder(self, choice: str, pipe: Any) -> Any:
        """The training-free phrase encoder, or an encoder loaded (once) from an official or trained folder."""
        if choice in ("", "phrase"):
            return PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer)
        if choice not in self._compass_encoders:
            folder = Path(choice).expanduser()
            if (folder / "compass_config.json").is_file():
                from .compass_train import load_trained_compass

                self._compass_encoders[choice] = load_trained_compass(folder)
            elif (folder / "args.pkl").is_file():  # official release: its rank-4 UNet LoRA comes with it
                self._compass_encoders[choice] = load_official_compass(folder, unet=pipe.unet)
                self._compass_loras.add(choice)
            else:
                raise PipelineError(f"Compass encoder {choice!r} is neither 'phrase' nor a folder holding an official "
                                    "(args.pkl) or trained (compass_config.json) checkpoint.")
        return self._compass_encoders[choice]

    def start_binding(self, pipe: Any, binding: SemanticBinding, call: dict[str, Any],
                      generators: list[torch.Generator]) -> None:
        """Composite tokens, then the step-0 refinement on our own initial noise (the loop starts at step 1's
        callback). The noise is drawn exactly as ``prepare_latents`` would, so seeds keep their meaning."""
        from diffusers.utils.torch_utils import randn_tensor

        positive, negative = call["prompt_embeds"], call["negative_prompt_embeds"]
        steps, height, width = call["num_inference_steps"], call["height"], call["width"]
        scale = pipe.vae_scale_factor
        shape = (positive.shape[0], pipe.unet.config.in_channels, height // scale, width // scale)
        noise = randn_tensor(shape, generator=generators, device=pipe._execution_device, dtype=positive.dtype)
        pipe.scheduler.set_timesteps(steps, device=pipe._execution_device)
        latents = noise * pipe.scheduler.init_noise_sigma
        positive = binding.prepare(positive, negative if call["guidance_scale"] > 1 else None, latents, height, width)
        latents, positive = binding.refine(0, pipe.scheduler.timesteps[0], latents, positive)
        call.update(latents=latents / pipe.scheduler.init_noise_sigma, prompt_embeds=positive)

    def heatmap_tokens(self, pipe: Any, parsed: ParsedPrompt, request: ImageRequest) -> list[tuple[str, list[int]]]:
        chosen = []
        for word in split_words(request.heatmap_words):
            span = find_words(parsed.text, word)
            if span is None:
                raise PipelineError(f"Heatmap word '{word}' does not occur in the prompt.")
            chosen.append((span.text, token_positions(pipe.tokenizer, parsed.text, span.start, span.end)))
        return chosen

    def save_heatmaps(self, images: list[Any], recorder: Any, tokens: list[tuple[str, list[int]]],
                      request: ImageRequest, variant: str) -> list[list[str]]:
        """[path, caption] per (image, word): the word's map averaged over its tokens, layers and steps."""
        if recorder is None or not recorder.maps:
            return []
        maps = recorder.aggregate().cpu().numpy()  # [batch, h, w, recorded tokens]
        saved, column = [], 0
        spans = []
        for word, positions in tokens:
            spans.append((word, column, column + len(positions)))
            column += len(positions)
        for index, image in enumerate(images):
            for word, first, last in spans:
                heat = maps[index, :, :, first:last].mean(-1)
                path = save_png(overlay(image, heat), {**request.parameters(), "heatmap_word": word,
                                                       "variant": variant, "seed": request.seed + index})
                saved.append([str(path), f"{variant} #{index + 1}: {word}"])
        return saved
