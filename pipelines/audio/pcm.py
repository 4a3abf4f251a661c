"""Audio helpers shared by the speech and song tabs: a growing chunk schedule, WAV files and bytes, stem mixing.

Exact codec seams live in ``codec_stream`` (holdback and left context derived from EnCodec's receptive field).
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..outputs import new_output_path, write_sidecar

VOCAL_GAIN = 0.5
ACCOMPANIMENT_GAIN = 0.5
LIMIT_CEILING = 0.89  # -1 dBFS


@dataclass(frozen=True)
class ChunkSchedule:
    """Frames per streamed chunk: a small first chunk, then chunks that grow geometrically up to ``largest``.

    VITA-Audio emits its first audio after the first forward and then decodes in larger blocks; without trained
    multi-token heads the training-free equivalent is to decode a small first chunk early and grow the chunks,
    which keeps the codec calls few while the first audio arrives after a handful of tokens.
    """

    first: int = 12
    growth: float = 2.0
    largest: int = 150

    def size(self, index: int) -> int:
        return int(min(self.largest, round(self.first * self.growth**index)))

    def boundaries(self, total: int) -> list[int]:
        """Cumulative chunk ends (in frames) covering ``total`` frames; the last one is ``total``."""
        ends: list[int] = []
        end, index = 0, 0
        while end < total:
            end = min(total, end + self.size(index))
            ends.append(end)
            index += 1
        return ends


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A complete mono 16-bit WAV file in memory (what a streaming gr.Audio takes per chunk)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sample_rate))
        handle.writeframes(to_int16(samples).tobytes())
    return buffer.getvalue()


def save_float_wav(audio: np.ndarray, sample_rate: int, parameters: dict[str, Any], task: str, name: str) -> str:
    """A float32 WAV (``[n]`` or ``[channels, n]``) in the output dir with its parameters sidecar: float, so a mix
    stays exactly the sum of its stems."""
    import soundfile

    path = new_output_path(task, f"-{name}.wav")
    soundfile.write(path, audio.T if audio.ndim == 2 else audio, sample_rate, subtype="FLOAT")
    write_sidecar(path, parameters)
    return str(path)


@dataclass
class AudioChunk:
    """One streamed piece of audio: the ``Partial`` value of the speech and song tabs. ``samples`` are float32,
    ``[n]`` (mono) or ``[n, channels]``; ``index`` counts the chunks of one stream from 0."""

    samples: np.ndarray
    sample_rate: int
    index: int


def mix_stems(vocals: np.ndarray, accompaniment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gain-staged stems and their sum: returns (vocals, accompaniment, mix).

    Each stem is limited to ±1 (vocal lines come peak-normalised, the accompaniment is hard-clipped, which real
    MusicGen output practically never reaches) and then scaled by a fixed gain (0.5 each, i.e. -6 dB), so the mix
    can never clip and is exactly the sum of the two stems, chunk by chunk while streaming."""
    vocal_stem = VOCAL_GAIN * np.clip(vocals, -1.0, 1.0)
    accompaniment_stem = ACCOMPANIMENT_GAIN * np.clip(accompaniment, -1.0, 1.0)
    return vocal_stem.astype(np.float32), accompaniment_stem.astype(np.float32), \
        (vocal_stem + accompaniment_stem).astype(np.float32)


def normalise_peak(audio: np.ndarray) -> np.ndarray:
    """Scaled to peak 1 (silence stays as it is): each sung line enters the mix at the same level."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return audio / peak if peak > 0 else audio


def limit_peak(audio: np.ndarray, ceiling: float = LIMIT_CEILING) -> np.ndarray:
    """Scaled down to ``ceiling`` only where it peaks above it (headroom for a song rendered in one piece)."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return (audio / peak * ceiling if peak > ceiling else audio).astype(np.float32)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    if source_rate == target_rate:
        return audio
    ratio = Fraction(target_rate, source_rate)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
