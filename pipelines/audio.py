"""Streaming helpers shared by the speech and song tabs: a growing chunk schedule, exact chunk seams, WAV bytes.

Seams: a codec chunk is decoded together with some already-played frames on its left (the decoder's convolutions
and LSTM then see the same past they see in a one-shot decode) and only the samples after the ones already
played are kept; the newest ``holdback`` frames are not played yet because a causal transposed convolution
still adds the next frame's overlap into them. No crossfade is needed: the concatenated chunks equal the one-shot
waveform up to the effect of the truncated left context (ParlerTTSStreamer's stride, made exact on the left).
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


class ChunkedDecoder:
    """Decode a growing code sequence chunk by chunk, returning only the samples not yet played.

    ``decode(codes)`` maps codes ``[..., frames]`` to a 1-D float waveform of ``frames * hop`` samples.
    """

    def __init__(self, decode: Callable[[object], np.ndarray], hop: int, context_frames: int = 150,
                 holdback_frames: int = 1) -> None:
        self.decode = decode
        self.hop = hop
        self.context_frames = context_frames
        self.holdback_frames = holdback_frames
        self.played = 0  # samples handed out so far

    def push(self, codes, final: bool = False) -> np.ndarray:
        """New samples for ``codes`` (all frames so far); with ``final`` the held-back tail is flushed too."""
        frames = codes.shape[-1]
        playable = frames * self.hop if final else max(0, (frames - self.holdback_frames) * self.hop)
        if playable <= self.played:
            return np.zeros(0, np.float32)
        start = max(0, self.played // self.hop - self.context_frames)
        audio = np.asarray(self.decode(codes[..., start:]), dtype=np.float32).reshape(-1)
        offset = start * self.hop
        new = audio[self.played - offset:playable - offset]
        self.played = playable
        return new


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
