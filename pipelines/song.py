"""Song tab: lyrics with structure tags to a song, in two modes (SongGen's mixed vs dual-track split).

- ``dual``: two tracks rendered separately and summed (SongGen dual-track, LeVo's separate vocal/BGM output).
  The accompaniment comes from MusicGen through Tokenworks' own decode loop (``musicgen.py``: delay pattern,
  CFG in one batch, static cache, lossless column drafting, streamed EnCodec decode). The vocals come from
  Bark, which sings text wrapped in ♪, one lyric line at a time, each placed in its line's slot on the
  accompaniment's timeline (sections get time in proportion to their lines).
- ``mixed``: one model renders the whole song: ACE-Step 1.5 through diffusers' ``AceStepPipeline``.

Headroom: each stem is limited to ±1 (vocal lines peak-normalised, accompaniment hard-clipped, which real
MusicGen output practically never reaches) and then scaled by a fixed gain (vocals 0.5, accompaniment 0.5, i.e.
-6 dB each), so the mix can never clip and is exactly the sum of the two stems, chunk by chunk while streaming.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import torch

from .audio import AudioChunk
from .bark import BARK_TEMPERATURE, BarkSettings, BarkTTS, load_bark, synthesize_steps
from .base import Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_range, require_text, resolve_seed
from .decoding.plain import SamplingConfig
from .models import ModelSpec, ModelStore, ResolvedModel
from .musicgen import stream_accompaniment
from .streaming import Returning, stream_in_thread
from .outputs import new_output_path, write_sidecar
from .presets import fetch_plan, first_usable, labelled_choices, models_for
from .tiny import tiny_ace_step, tiny_musicgen

MODES = ("dual", "mixed")
MODE_LABELS = {
    "dual": "dual-track: MusicGen accompaniment + Bark vocals, mixed",
    "mixed": "mixed: ACE-Step 1.5 renders the whole song",
}
# The models each mode runs, by kind, and the request field (the tab's picker) that names each one.
MODE_KINDS = {"dual": ("musicgen", "bark"), "mixed": ("ace-step",)}
MODEL_FIELDS = {"musicgen": "accompaniment_model", "bark": "vocal_model", "ace-step": "song_model"}
MODEL_ROLES = {"musicgen": "accompaniment model", "bark": "vocals model", "ace-step": "song model"}
MAX_DURATION_S = {"dual": 30.0, "mixed": 240.0}  # MusicGen's sinusoidal positions cap it at ~30 s
VOCAL_GAIN = 0.5
ACCOMPANIMENT_GAIN = 0.5
INSTRUMENTAL_WEIGHT = 1.0  # an untexted section gets the time of one sung line
INSTRUMENTAL_TAGS = {"intro", "outro", "instrumental", "inst", "interlude", "break", "solo"}
SECTION_TAG = re.compile(r"^\s*\[([^\[\]]+)\]\s*$")
EXAMPLE_LYRICS = """[intro]

[verse]
Morning light on the harbour wall
Gulls are singing over it all

[chorus]
Sail away, sail away
Into the blue of a brand new day

[outro]
"""


@dataclass
class Section:
    tag: str
    lines: list[str] = field(default_factory=list)

    @property
    def instrumental(self) -> bool:
        return not self.lines


def parse_sections(lyrics: str) -> list[Section]:
    """Split lyrics at ``[tag]`` lines. Tags are lower-cased and may carry a number (``[Verse 2]``); text before
    the first tag is a verse; blank lines are dropped; a tag without lines is an instrumental section."""
    sections: list[Section] = []
    for raw in lyrics.splitlines():
        line = raw.strip()
        if not line:
            continue
        tag = SECTION_TAG.match(line)
        if tag:
            sections.append(Section(" ".join(tag.group(1).lower().split())))
            continue
        if not sections:
            sections.append(Section("verse"))
        sections[-1].lines.append(line)
    return sections


@dataclass
class TimedLine:
    text: str
    start_s: float
    end_s: float


@dataclass
class TimedSection:
    tag: str
    start_s: float
    end_s: float
    lines: list[TimedLine]


def plan_timeline(sections: list[Section], duration_s: float) -> list[TimedSection]:
    """Map sections to time on the accompaniment: each sung line weighs 1, an instrumental section
    ``INSTRUMENTAL_WEIGHT``; a section's lines share its span equally."""
    weights = [len(s.lines) or INSTRUMENTAL_WEIGHT for s in sections]
    total = sum(weights)
    timed: list[TimedSection] = []
    start = 0.0
    for section, weight in zip(sections, weights):
        end = start + duration_s * weight / total
        slot = (end - start) / max(len(section.lines), 1)
        lines = [TimedLine(text, start + i * slot, start + (i + 1) * slot) for i, text in enumerate(section.lines)]
        timed.append(TimedSection(section.tag, start, end, lines))
        start = end
    return timed


def mix_stems(vocals: np.ndarray, accompaniment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gain-staged stems and their sum (see the module docstring): returns (vocals, accompaniment, mix)."""
    vocal_stem = VOCAL_GAIN * np.clip(vocals, -1.0, 1.0)
    accompaniment_stem = ACCOMPANIMENT_GAIN * np.clip(accompaniment, -1.0, 1.0)
    return vocal_stem.astype(np.float32), accompaniment_stem.astype(np.float32), \
        (vocal_stem + accompaniment_stem).astype(np.float32)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    if source_rate == target_rate:
        return audio
    ratio = Fraction(target_rate, source_rate)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


@dataclass
class SongRequest(Request):
    lyrics: str = ""
    style: str = ""
    duration_s: float = 10.0
    mode: str = "dual"
    draft: bool = True  # lossless column drafting in the MusicGen loop (dual mode)
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    steps: int = 8  # ACE-Step turbo: 8 steps (model card)
    accompaniment_model: str = ""  # a listed MusicGen name ("" = the first usable one)
    vocal_model: str = ""  # a listed Bark name
    song_model: str = ""  # a listed ACE-Step name (mixed mode)


@dataclass
class Musicgen:
    model: Any
    tokenizer: Any

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}


def load_musicgen(resolved: ResolvedModel, store: ModelStore) -> Musicgen:
    if resolved.source == "tiny":
        model, tokenizer = tiny_musicgen()
        return Musicgen(model.to(store.device), tokenizer)
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    model = MusicgenForConditionalGeneration.from_pretrained(resolved.location, dtype=store.dtype,
                                                             attn_implementation="sdpa")
    return Musicgen(model.to(store.device).eval(), tokenizer)


def load_ace_step(resolved: ResolvedModel, store: ModelStore):
    if resolved.source == "tiny":
        return tiny_ace_step().to(store.device)
    from diffusers import AceStepPipeline

    pipe = AceStepPipeline.from_pretrained(resolved.location, torch_dtype=store.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(store.device)


LOADERS = {"musicgen": load_musicgen, "bark": load_bark, "ace-step": load_ace_step}


def write_wav(audio: np.ndarray, sample_rate: int, parameters: dict[str, Any], name: str) -> str:
    import soundfile

    path = new_output_path("song", f"-{name}.wav")
    soundfile.write(path, audio.T if audio.ndim == 2 else audio, sample_rate, subtype="FLOAT")
    write_sidecar(path, parameters)
    return str(path)


class SongPipeline(Pipeline):
    task = "song"
    request_type = SongRequest

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        self.store = store
        self.preset = preset
        self.specs = models_for("song", preset)

    def candidates(self, kind: str) -> list[ModelSpec]:
        return [spec for spec in self.specs if spec.kind == kind]

    def spec(self, kind: str, name: str = "") -> ModelSpec:
        """The listed model of ``kind`` called ``name`` (its name or Hub id); for "" the first usable one, else
        the first listed one."""
        candidates = self.candidates(kind)
        if not candidates:
            raise PipelineError(f"No {kind} model is listed for the song tab under preset {self.preset!r}.")
        if not name:
            return first_usable(candidates, self.store) or candidates[0]
        for spec in candidates:
            if name in (spec.name, spec.hub_id):
                return spec
        raise PipelineError(f"Unknown {MODEL_ROLES[kind]} {name!r}. Choose one of: "
                            f"{', '.join(spec.name for spec in candidates)}.")

    def load(self, kind: str, name: str = "") -> Any:
        return self.store.load(self.spec(kind, name), LOADERS[kind])

    def model_choices(self, kind: str) -> list[tuple[str, str]]:
        """The picker of ``kind``: (label, name) per listed model, marked as available here or needing a download."""
        return labelled_choices(self.candidates(kind), self.store)

    def default_model_name(self, kind: str) -> str:
        return self.spec(kind).name

    def usable_modes(self) -> list[str]:
        """The modes whose every model can run now (here, or downloaded from a Hub that answers)."""
        return [mode for mode, kinds in MODE_KINDS.items()
                if all(first_usable(self.candidates(kind), self.store) for kind in kinds)]

    def usable(self) -> bool:
        return bool(self.usable_modes())

    def fetch_plan(self) -> list[tuple[str, list[str]]]:
        """What downloads make the default (dual-track) mode run: a MusicGen and a Bark, as (name, repositories)."""
        return [item for kind in MODE_KINDS["dual"] for item in fetch_plan(self.candidates(kind), self.store)]

    def validate(self, request: SongRequest) -> list[Section]:
        if request.mode not in MODES:
            raise PipelineError(f"Unknown mode {request.mode!r}. Choose one of: {', '.join(MODES)}.")
        require_text(request.lyrics, "Lyrics")
        require_text(request.style, "Style")
        require_range(request.duration_s, "Duration (s)", 1.0, MAX_DURATION_S[request.mode])
        require_range(request.guidance_scale, "Guidance scale", 1.0, 15.0)
        require_range(request.temperature, "Temperature", 0.0, 5.0)
        require_range(request.top_k, "Top-k", 0, 4096)
        require_range(request.steps, "Steps", 1, 100)
        for kind in MODE_KINDS[request.mode]:
            self.spec(kind, getattr(request, MODEL_FIELDS[kind]))  # an unknown name fails before any work
        request.seed = resolve_seed(request.seed)
        sections = parse_sections(request.lyrics)
        if not any(section.lines for section in sections):
            raise PipelineError("The lyrics have no sung lines. Add lines under a tag such as [verse].")
        return sections

    def parameters(self, request: SongRequest) -> dict[str, Any]:
        return {"lyrics": request.lyrics, "style": request.style, "duration_s": request.duration_s,
                "mode": request.mode, "seed": request.seed, "draft": request.draft,
                "guidance_scale": request.guidance_scale, "temperature": request.temperature,
                "top_k": request.top_k, "steps": request.steps,
                **{MODEL_FIELDS[kind]: self.spec(kind, getattr(request, MODEL_FIELDS[kind])).name
                   for kind in MODE_KINDS[request.mode]}}

    def generate(self, request: SongRequest) -> Iterator[Event]:
        sections = self.validate(request)
        if request.mode == "dual":
            yield from self.generate_dual(request, sections)
        else:
            yield from self.generate_mixed(request)

    def render_vocals(self, tts: BarkTTS, timeline: list[TimedSection], sample_rate: int, vocals: np.ndarray,
                      request: SongRequest, stats: dict[str, Any]) -> Iterator[Event | int]:
        """Sing each line with Bark (``♪ line ♪``) through the decoding core, at most its slot long (the semantic
        budget is the slot times Bark's semantic rate), peak-normalised and written into ``vocals`` at its slot's
        start. Lines go in timeline order and each writes only inside its own slot, so after each line (and
        once before the first) this yields the sample index below which ``vocals`` is final."""
        total = vocals.size
        lines = [line for section in timeline for line in section.lines]
        starts = [min(total, int(round(line.start_s * sample_rate))) for line in lines] + [total]
        yield starts[0]
        for index, line in enumerate(lines):
            request.cancel.raise_if_cancelled()
            yield Progress(index, len(lines), f"singing line {index + 1}/{len(lines)}")
            slot_s = line.end_s - line.start_s
            settings = BarkSettings(SamplingConfig(temperature=BARK_TEMPERATURE, seed=request.seed + index),
                                    drafting=request.draft, stream=False,
                                    max_semantic_tokens=max(1, math.ceil(slot_s * tts.semantic.semantic_rate_hz)))
            steps = Returning(synthesize_steps(tts, f"♪ {line.text} ♪", settings, request.cancel))
            pieces = []
            for item in steps:
                if isinstance(item, Progress):
                    yield replace(item, note=f"singing line {index + 1}/{len(lines)}: {item.note}")
                else:
                    pieces.append(item)
            sung = np.concatenate(pieces)
            for stage in ("semantic", "coarse"):
                decode = getattr(steps.value, f"{stage}_stats")
                stats[f"vocal_{stage}_tokens"] = stats.get(f"vocal_{stage}_tokens", 0) + decode.new_tokens
                stats[f"vocal_{stage}_forwards"] = stats.get(f"vocal_{stage}_forwards", 0) + decode.forwards
            sung = resample(sung, tts.sample_rate, sample_rate)
            peak = float(np.abs(sung).max()) if sung.size else 0.0
            if peak > 0:
                sung = sung / peak
            start = starts[index]
            end = min(total, int(round(line.end_s * sample_rate)), start + sung.size)
            vocals[start:end] = sung[:end - start]
            yield starts[index + 1]

    def generate_dual(self, request: SongRequest, sections: list[Section]) -> Iterator[Event]:
        started = time.perf_counter()
        yield Progress(0, 1, "loading MusicGen and Bark")
        musicgen = self.load("musicgen", request.accompaniment_model)
        singer = self.load("bark", request.vocal_model)
        codec_config = musicgen.model.audio_encoder.config
        sample_rate = int(codec_config.sampling_rate)
        hop = int(np.prod(codec_config.upsampling_ratios))
        frame_rate = sample_rate / hop
        num_frames = max(1, round(request.duration_s * frame_rate))
        total = num_frames * hop
        timeline = plan_timeline(sections, total / sample_rate)
        vocals = np.zeros(total, dtype=np.float32)
        vocal_stats: dict[str, Any] = {}
        singing = self.render_vocals(singer, timeline, sample_rate, vocals, request, vocal_stats)
        final = 0  # vocals[:final] are sung

        def sing_until(sample: int) -> Iterator[Event]:
            """Sing lines until the vocals below ``sample`` are final: each chunk of the mix waits only for
            the lines it overlaps, so the first audio does not wait for the whole vocal track."""
            nonlocal final
            while final < sample:
                item = next(singing)
                if isinstance(item, int):
                    final = item
                else:
                    yield item

        sampling = SamplingConfig(temperature=float(request.temperature), top_k=int(request.top_k), seed=request.seed)
        position, index = 0, 0
        first_audio_s = None
        stream = Returning(stream_accompaniment(musicgen.model, musicgen.tokenizer, request.style, num_frames,
                                                sampling, float(request.guidance_scale), draft=request.draft,
                                                cancel=request.cancel))
        for chunk in stream:
            if isinstance(chunk, Progress):
                yield chunk
                continue
            yield from sing_until(position + chunk.size)
            segment = vocals[position:position + chunk.size]
            _, _, mixed = mix_stems(segment, chunk)
            position += chunk.size
            first_audio_s = first_audio_s if first_audio_s is not None else time.perf_counter() - started
            yield Partial(AudioChunk(mixed, sample_rate, index))
            index += 1
        yield from sing_until(total)
        vocals_done_s = time.perf_counter() - started
        accompaniment = stream.value
        vocal_stem, accompaniment_stem, mix = mix_stems(vocals, accompaniment.audio)
        elapsed = time.perf_counter() - started
        decode = accompaniment.stats
        parameters = self.parameters(request)
        files = {name: write_wav(audio, sample_rate, parameters, name)
                 for name, audio in (("mix", mix), ("vocals", vocal_stem), ("accompaniment", accompaniment_stem))}
        audio_s = total / sample_rate
        stats = {
            "mode": "dual",
            "mode_label": MODE_LABELS["dual"],
            "accompaniment_model": self.spec("musicgen", request.accompaniment_model).name,
            "vocal_model": self.spec("bark", request.vocal_model).name,
            "audio_s": round(audio_s, 3),
            "sample_rate": sample_rate,
            "time_s": round(elapsed, 4),
            "rtf": round(elapsed / audio_s, 4),
            "time_to_first_audio_s": round(first_audio_s or elapsed, 4),
            "vocals_s": round(vocals_done_s, 4),
            "accompaniment_rtf": round(accompaniment.decode_s / audio_s, 4),
            "forwards": decode.forwards,
            "columns": decode.new_tokens,
            "tau": round(decode.tau, 4),
            "drafting": bool(request.draft),
            "drafted_columns": decode.drafted,
            "cache": "static" if decode.static_cache else "dynamic",
            **vocal_stats,
            "vocal_tau": round((vocal_stats["vocal_semantic_tokens"] + vocal_stats["vocal_coarse_tokens"])
                               / max(vocal_stats["vocal_semantic_forwards"] + vocal_stats["vocal_coarse_forwards"], 1), 4),
            "sections": len(timeline),
            "sung_lines": sum(len(s.lines) for s in timeline),
            "seed": request.seed,
        }
        metadata = {"files": files, "timeline": [
            {"tag": s.tag, "start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3),
             "lines": [{"text": ln.text, "start_s": round(ln.start_s, 3), "end_s": round(ln.end_s, 3)} for ln in s.lines]}
            for s in timeline]}
        yield Result(files, stats, metadata)

    def generate_mixed(self, request: SongRequest) -> Iterator[Event]:
        started = time.perf_counter()
        yield Progress(0, int(request.steps), "loading ACE-Step")
        pipe = self.load("ace-step", request.song_model)
        progress: list[int] = []

        def render(emit) -> Any:
            """The stock call on a worker thread, so each diffusion step's Progress streams out as it happens."""

            def on_step_end(pipeline, step, timestep, callback_kwargs):
                progress.append(step)
                emit(Progress(step + 1, int(request.steps), "diffusion"))
                if request.cancel.cancelled:
                    pipeline._interrupt = True
                return callback_kwargs

            generator = torch.Generator(device="cpu").manual_seed(request.seed)
            return pipe(prompt=request.style, lyrics=request.lyrics, audio_duration=float(request.duration_s),
                        num_inference_steps=int(request.steps), guidance_scale=float(request.guidance_scale),
                        generator=generator, callback_on_step_end=on_step_end)

        output = yield from stream_in_thread(render, request.cancel)
        request.cancel.raise_if_cancelled()
        audio = output.audios[0].float().cpu().numpy()
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        mix = (audio / peak * 0.89 if peak > 0.89 else audio).astype(np.float32)  # -1 dBFS ceiling
        sample_rate = int(pipe.sample_rate)
        elapsed = time.perf_counter() - started
        yield Partial(AudioChunk(mix.T, sample_rate, 0))
        files = {"mix": write_wav(mix, sample_rate, self.parameters(request), "mix")}
        audio_s = mix.shape[-1] / sample_rate
        stats = {
            "mode": "mixed",
            "mode_label": MODE_LABELS["mixed"],
            "model": self.spec("ace-step", request.song_model).name,
            "audio_s": round(audio_s, 3),
            "sample_rate": sample_rate,
            "time_s": round(elapsed, 4),
            "rtf": round(elapsed / audio_s, 4) if audio_s else 0.0,
            "time_to_first_audio_s": round(elapsed, 4),
            "steps": len(progress),
            "seed": request.seed,
        }
        yield Result(files, stats, {"files": files})
