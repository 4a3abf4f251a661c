"""Speech tab: text to speech, streamed so the first audio plays early, with latency and decoding stats.

Backends: the offline voices that ship on PyPI (hibari, 24 kHz; Piper "joe", 22.05 kHz), streamed sentence by
sentence, and Bark (``pipelines/audio/bark.py``), whose token AR stages run through the lossless chain draft-and-verify
loop and whose audio is decoded in chunks that start small and grow.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from ..audio.bark import BARK_TEMPERATURE, BarkOutput, BarkSettings, BarkTTS, load_bark, synthesize_steps
from ..audio.pcm import AudioChunk, wav_bytes
from ..base import (Event, Partial, Pipeline, PipelineError, Progress, Request, Result, require_range, require_text,
                    resolve_seed)
from ..decoding.plain import SamplingConfig
from ..models import ModelSpec, ModelStore, ResolvedModel
from ..outputs import new_output_path, write_sidecar
from ..presets import PresetModels
from ..streaming import Returning

MAX_TEXT_CHARS = 2000


@dataclass
class SpeechRequest(Request):
    text: str = ""
    model: str = ""  # a voice/model name from the preset, a Bark Hub id or local folder; "" = the tab default
    speed: float = 1.0
    temperature: float = BARK_TEMPERATURE  # Bark only; 0 = greedy
    drafting: bool = True  # Bark only: chain draft-and-verify (lossless) instead of one token per forward
    stream: bool = True  # Bark only: chunked fine + codec decode as tokens arrive


@dataclass
class OfflineVoice:
    """A packaged ONNX voice: ``stream(text, speed, seed)`` yields one waveform per sentence."""

    engine: Any
    kind: str
    sample_rate: int
    components: dict[str, Any] = field(default_factory=dict)

    def stream(self, text: str, speed: float, seed: int) -> Iterator[np.ndarray]:
        if self.kind == "hibari":
            yield from self.engine.stream(text, speed=speed, seed=seed)
            return
        from piper import SynthesisConfig

        for chunk in self.engine.synthesize(text, SynthesisConfig(length_scale=1.0 / speed)):
            yield chunk.audio_float_array


def load_offline_voice(resolved: ResolvedModel, store: ModelStore) -> OfflineVoice:
    """Loader of the packaged voices; Bark specs load with ``bark.load_bark``, shared with the song tab."""
    spec = resolved.spec
    if spec.kind == "hibari":
        from hibari import SAMPLE_RATE, Hibari

        tts = Hibari(voice=spec.option("voice", "heart"))
        tts.g2p  # load the G2P now so the first sentence is not charged for it
        return OfflineVoice(tts, "hibari", SAMPLE_RATE)
    from pathlib import Path

    from piper import PiperVoice

    voice = PiperVoice.load(Path(resolved.location) / spec.option("file", "en_US-joe-medium.onnx"))
    return OfflineVoice(voice, "piper", int(voice.config.sample_rate))


class SpeechPipeline(PresetModels, Pipeline):
    task = "speech"
    unknown_label = "voice"
    request_type = SpeechRequest

    def unlisted(self, name: str) -> ModelSpec:
        return ModelSpec(name, "bark", hub_id=name)

    def validate(self, request: SpeechRequest) -> None:
        text = require_text(request.text, "Text")
        if len(text) > MAX_TEXT_CHARS:
            raise PipelineError(f"The text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}. Shorten it.")
        require_range(request.speed, "Speed", 0.5, 2.0)
        require_range(request.temperature, "Temperature", 0.0, 2.0)
        request.seed = resolve_seed(request.seed)

    def generate(self, request: SpeechRequest) -> Iterator[Event]:
        self.validate(request)
        spec = self.spec_for(request.model)
        if spec.kind == "bark" and abs(float(request.speed) - 1.0) > 1e-6:
            raise PipelineError("Bark has no speed control. Set speed to 1.0, or pick hibari or Piper.")
        yield Progress(0, 1, "loading model")
        model = self.store.load(spec, load_bark if spec.kind == "bark" else load_offline_voice)
        start = time.perf_counter()
        first_audio_s: float | None = None
        pieces: list[np.ndarray] = []
        extra: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        sample_rate = model.sample_rate
        if isinstance(model, BarkTTS):
            settings = BarkSettings(SamplingConfig(temperature=float(request.temperature), seed=request.seed),
                                    drafting=bool(request.drafting), stream=bool(request.stream),
                                    max_semantic_tokens=spec.option("max_semantic_tokens"))
            chunks = Returning(synthesize_steps(model, request.text, settings, request.cancel))
        else:
            chunks = model.stream(request.text, float(request.speed), request.seed)
        for samples in chunks:
            if isinstance(samples, Progress):  # one per AR forward: a point where the consumer can stop
                yield samples
                continue
            request.cancel.raise_if_cancelled()
            if samples.size == 0:
                continue
            if first_audio_s is None:
                first_audio_s = time.perf_counter() - start
            pieces.append(samples)
            yield Partial(AudioChunk(samples, sample_rate, len(pieces) - 1))
            yield Progress(len(pieces), len(pieces) + 1, "synthesising")
        elapsed = time.perf_counter() - start
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        if audio.size == 0:
            raise PipelineError("The voice produced no audio for this text. Try words rather than symbols only.")
        if isinstance(model, BarkTTS):
            extra, metadata = bark_stats(chunks.value, settings)
        audio_s = audio.size / sample_rate
        stats = {
            "model": spec.name,
            "sample_rate": sample_rate,
            "audio_s": round(audio_s, 4),
            "time_s": round(elapsed, 4),
            "time_to_first_audio_s": round(first_audio_s or 0.0, 4),
            "rtf": round(elapsed / audio_s, 4),
            "chunks": len(pieces),
            "seed": request.seed,
            **extra,
        }
        path = new_output_path("speech", ".wav")
        path.write_bytes(wav_bytes(audio, sample_rate))
        parameters = {"task": "speech", "text": request.text, "model": spec.name, "speed": float(request.speed),
                      "seed": request.seed, "stats": stats}
        if isinstance(model, BarkTTS):
            parameters.update(temperature=float(request.temperature), drafting=bool(request.drafting),
                              stream=bool(request.stream))
        sidecar = write_sidecar(path, parameters)
        metadata.update(sidecar=str(sidecar), chunk_samples=[int(p.size) for p in pieces])
        yield Result(str(path), stats, metadata)


def bark_stats(output: BarkOutput, settings: BarkSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """τ per AR stage and overall (tokens committed per forward), plus the token ids for reproducibility."""
    semantic, coarse = output.semantic_stats, output.coarse_stats
    forwards = semantic.forwards + coarse.forwards
    stats = {
        "drafting": settings.drafting,
        "streamed": settings.stream,
        "tau": round((semantic.new_tokens + coarse.new_tokens) / forwards, 4) if forwards else 0.0,
        "tau_semantic": round(semantic.tau, 4),
        "tau_coarse": round(coarse.tau, 4),
        "semantic_tokens": semantic.new_tokens,
        "coarse_tokens": coarse.new_tokens,
        "forwards": forwards,
    }
    metadata = {"semantic_ids": output.semantic, "coarse_ids": output.coarse,
                "schedule": asdict(settings.schedule)}
    return stats, metadata

