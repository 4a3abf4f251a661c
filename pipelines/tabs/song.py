"""Song tab: lyrics with structure tags to a song, in two modes (SongGen's mixed vs dual-track split).

- ``dual``: two tracks rendered separately and summed (SongGen dual-track, LeVo's separate vocal/BGM output).
  The accompaniment comes from MusicGen through Tokenworks' own decode loop (``audio/musicgen.py``: delay
  pattern, CFG in one batch, static cache, lossless column drafting, streamed EnCodec decode). The vocals come
  from Bark, which sings text wrapped in ♪, one lyric line at a time, each placed in its line's slot on the
  accompaniment's timeline (``audio/vocals.py``; sections get time in proportion to their lines,
  ``audio/lyrics.py``).
  The stems are gain-staged so their sum never clips (``audio.pcm.mix_stems``), chunk by chunk while streaming.
- ``mixed``: one model renders the whole song: ACE-Step 1.5 through diffusers' ``AceStepPipeline``
  (``audio/ace_step.py``).
- ``offline``: micro-song (``microsong/``), a note model trained here and committed: chords and a note per syllable
  decoded by the decoding core (prompt lookup drafts the repeats), played bar by bar by a numpy synth with
  formant-synth vocals. Listed last: the default only when the Hub models cannot run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from ..audio.ace_step import load_ace_step, render_song
from ..audio.bark import load_bark
from ..audio.lyrics import Section, TimedSection, describe_timeline, parse_sections, plan_timeline
from ..audio.musicgen import Accompaniment, load_musicgen, stream_accompaniment
from ..audio.pcm import AudioChunk, mix_stems, save_float_wav
from ..audio.vocals import VocalTrack
from ..base import (Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_choice, require_range,
                    require_text, resolve_seed)
from ..decoding.plain import SamplingConfig
from ..microsong.model import load_note_model
from ..microsong.song import SAMPLE_RATE, stream_events
from ..models import ModelSpec, ModelStore
from ..presets import fetch_plan, find_spec, first_usable, labelled_choices, models_for
from ..streaming import Returning

MODES = ("dual", "mixed", "offline")
MODE_LABELS = {
    "dual": "dual-track: MusicGen accompaniment + Bark vocals, mixed",
    "mixed": "mixed: ACE-Step 1.5 renders the whole song",
    "offline": "micro-song: our small note model + synth (formant vocals), offline",
}
# The models each mode runs, by kind, and the request field (the tab's picker) that names each one.
MODE_KINDS = {"dual": ("musicgen", "bark"), "mixed": ("ace-step",), "offline": ("microsong",)}
MODEL_FIELDS = {"musicgen": "accompaniment_model", "bark": "vocal_model", "ace-step": "song_model",
                "microsong": "note_model"}
MODEL_ROLES = {"musicgen": "accompaniment model", "bark": "vocals model", "ace-step": "song model",
               "microsong": "note model"}
# MusicGen's sinusoidal positions cap dual at ~30 s; a micro-song's length follows its lyrics and tempo (ignored)
MAX_DURATION_S = {"dual": 30.0, "mixed": 240.0, "offline": 240.0}
LOADERS = {"musicgen": load_musicgen, "bark": load_bark, "ace-step": load_ace_step, "microsong": load_note_model}


@dataclass
class SongRequest(Request):
    lyrics: str = ""
    style: str = ""
    duration_s: float = 10.0
    mode: str = "dual"
    draft: bool = True  # lossless drafting: MusicGen's column lookup (dual), prompt lookup over notes (offline)
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    steps: int = 8  # ACE-Step turbo: 8 steps (model card)
    accompaniment_model: str = ""  # a listed MusicGen name ("" = the first usable one)
    vocal_model: str = ""  # a listed Bark name
    song_model: str = ""  # a listed ACE-Step name (mixed mode)
    note_model: str = ""  # a listed micro-song note model (offline mode)


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
        spec = find_spec(candidates, name)
        if spec is None:
            raise PipelineError(f"Unknown {MODEL_ROLES[kind]} {name!r}. Choose one of: "
                                f"{', '.join(spec.name for spec in candidates)}.")
        return spec

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
        require_choice(request.mode, "mode", MODES)
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
            yield from {"mixed": self.generate_mixed, "offline": self.generate_offline}[request.mode](request)

    def generate_dual(self, request: SongRequest, sections: list[Section]) -> Iterator[Event]:
        started = time.perf_counter()
        yield Progress(0, 1, "loading MusicGen and Bark")
        musicgen = self.load("musicgen", request.accompaniment_model)
        singer = self.load("bark", request.vocal_model)
        sample_rate, hop, num_frames = musicgen.geometry(request.duration_s)
        total = num_frames * hop
        timeline = plan_timeline(sections, total / sample_rate)
        vocals = VocalTrack(singer, timeline, sample_rate, total, request.seed, request.draft, request.cancel)
        sampling = SamplingConfig(temperature=float(request.temperature), top_k=int(request.top_k), seed=request.seed)
        stream = Returning(stream_accompaniment(musicgen.model, musicgen.tokenizer, request.style, num_frames,
                                                sampling, float(request.guidance_scale), draft=request.draft,
                                                cancel=request.cancel))
        position, index, first_audio_s = 0, 0, None
        for chunk in stream:
            if isinstance(chunk, Progress):
                yield chunk
                continue
            yield from vocals.until(position + chunk.size)  # the chunk waits only for the lines it overlaps
            _, _, mixed = mix_stems(vocals.samples[position:position + chunk.size], chunk)
            position += chunk.size
            first_audio_s = first_audio_s if first_audio_s is not None else time.perf_counter() - started
            yield Partial(AudioChunk(mixed, sample_rate, index))
            index += 1
        yield from vocals.until(total)
        vocals_s = time.perf_counter() - started
        vocal_stem, accompaniment_stem, mix = mix_stems(vocals.samples, stream.value.audio)
        elapsed = time.perf_counter() - started
        files = self.save_stems(request, sample_rate, mix, vocal_stem, accompaniment_stem)
        timings = {"time_s": elapsed, "time_to_first_audio_s": first_audio_s or elapsed, "vocals_s": vocals_s}
        stats = self.dual_stats(request, stream.value, vocals, timeline, timings)
        yield Result(files, stats, {"files": files, "timeline": describe_timeline(timeline)})

    def save_stems(self, request: SongRequest, sample_rate: int, mix, vocals, accompaniment) -> dict[str, str]:
        """The mix and both stems as float WAVs, each with the request's parameters beside it."""
        parameters = self.parameters(request)
        return {name: save_float_wav(audio, sample_rate, parameters, "song", name)
                for name, audio in (("mix", mix), ("vocals", vocals), ("accompaniment", accompaniment))}

    def generate_offline(self, request: SongRequest) -> Iterator[Event]:
        """Micro-song: each bar mixed and streamed the moment the decoder completes it (``microsong.song``)."""
        started = time.perf_counter()
        yield Progress(0, 1, "loading the micro-song note model")
        note = self.load("microsong", request.note_model)
        sampling = SamplingConfig(temperature=float(request.temperature), top_k=int(request.top_k), seed=request.seed)
        take = yield from stream_events(note, request.lyrics, request.style, sampling, request.draft, request.seed,
                                        request.cancel, started)
        vocals, accompaniment, mix = mix_stems(take.vocals, take.accompaniment)
        files = self.save_stems(request, SAMPLE_RATE, mix, vocals, accompaniment)
        stats = {"mode": "offline", "mode_label": MODE_LABELS["offline"], "drafting": bool(request.draft),
                 "model": self.spec("microsong", request.note_model).name, "seed": request.seed,
                 **take.describe(time.perf_counter() - started)}
        yield Result(files, stats, {"files": files, "tokens": " ".join(take.tokens)})

    def dual_stats(self, request: SongRequest, accompaniment: Accompaniment, vocals: VocalTrack,
                   timeline: list[TimedSection], timings: dict[str, float]) -> dict[str, Any]:
        """What a dual-track run measured: wall times (``timings``), real-time factors, and both decoders' counts."""
        audio_s, elapsed = vocals.samples.size / accompaniment.sample_rate, timings["time_s"]
        decode = accompaniment.stats
        return {
            "mode": "dual",
            "mode_label": MODE_LABELS["dual"],
            "accompaniment_model": self.spec("musicgen", request.accompaniment_model).name,
            "vocal_model": self.spec("bark", request.vocal_model).name,
            "audio_s": round(audio_s, 3),
            "sample_rate": accompaniment.sample_rate,
            "time_s": round(elapsed, 4),
            "rtf": round(elapsed / audio_s, 4),
            "time_to_first_audio_s": round(timings["time_to_first_audio_s"], 4),
            "vocals_s": round(timings["vocals_s"], 4),
            "accompaniment_rtf": round(accompaniment.decode_s / audio_s, 4),
            "forwards": decode.forwards,
            "columns": decode.new_tokens,
            "tau": round(decode.tau, 4),
            "drafting": bool(request.draft),
            "drafted_columns": decode.drafted,
            "cache": "static" if decode.static_cache else "dynamic",
            **vocals.stats(),
            "sections": len(timeline),
            "sung_lines": sum(len(s.lines) for s in timeline),
            "seed": request.seed,
        }

    def generate_mixed(self, request: SongRequest) -> Iterator[Event]:
        started = time.perf_counter()
        yield Progress(0, int(request.steps), "loading ACE-Step")
        pipe = self.load("ace-step", request.song_model)
        song = yield from render_song(pipe, request.style, request.lyrics, float(request.duration_s),
                                      int(request.steps), float(request.guidance_scale), request.seed, request.cancel)
        elapsed = time.perf_counter() - started
        yield Partial(AudioChunk(song.audio.T, song.sample_rate, 0))
        files = {"mix": save_float_wav(song.audio, song.sample_rate, self.parameters(request), "song", "mix")}
        audio_s = song.audio.shape[-1] / song.sample_rate
        stats = {"mode": "mixed", "mode_label": MODE_LABELS["mixed"], "audio_s": round(audio_s, 3),
                 "model": self.spec("ace-step", request.song_model).name, "sample_rate": song.sample_rate,
                 "time_s": round(elapsed, 4),
                 "rtf": round(elapsed / audio_s, 4) if audio_s else 0.0, "time_to_first_audio_s": round(elapsed, 4),
                 "steps": song.steps, "seed": request.seed}
        yield Result(files, stats, {"files": files})
