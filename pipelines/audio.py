"""Streaming helpers shared by the speech and song tabs: a growing chunk schedule and WAV bytes.

Exact codec seams live in ``codec_stream`` (holdback and left context derived from EnCodec's receptive field).
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    Path(path).write_bytes(wav_bytes(samples, sample_rate))
    return Path(path)


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    """(sample_rate, float32 samples) of a mono 16-bit WAV given as bytes."""
    with wave.open(io.BytesIO(data), "rb") as handle:
        rate = handle.getframerate()
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return rate, pcm.astype(np.float32) / 32767.0


@dataclass
class AudioChunk:
    """One streamed piece of audio: the ``Partial`` value of the speech and song tabs. ``samples`` are float32,
    ``[n]`` (mono) or ``[n, channels]``; ``index`` counts the chunks of one stream from 0."""

    samples: np.ndarray
    sample_rate: int
    index: int
