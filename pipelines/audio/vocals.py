"""The dual-track song's vocal stem: Bark sings each lyric line (``♪ line ♪``) through the decoding core, into
its line's slot on the song's timeline.

Lines are sung lazily, in timeline order, only as far as the streamed mix has reached: each chunk of the mix
waits for the lines it overlaps, not for the whole vocal track, so the first audio comes early.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Generator, Iterator

import numpy as np

from ..base import CancelToken, Event, Progress
from ..decoding.plain import SamplingConfig
from ..streaming import Returning
from .bark import BARK_TEMPERATURE, BarkOutput, BarkSettings, BarkTTS, synthesize_steps
from .lyrics import TimedLine, TimedSection
from .pcm import normalise_peak, resample


def sing_line(tts: BarkTTS, text: str, budget_s: float, seed: int, drafting: bool, cancel: CancelToken,
              label: str) -> Generator[Progress, None, tuple[np.ndarray, BarkOutput]]:
    """Sing one line at Bark's temperature, at most ``budget_s`` long (the semantic token budget is that times
    Bark's semantic rate); yield its Progress (notes prefixed by ``label``), return its audio and BarkOutput."""
    settings = BarkSettings(SamplingConfig(temperature=BARK_TEMPERATURE, seed=seed), drafting=drafting, stream=False,
                            max_semantic_tokens=max(1, math.ceil(budget_s * tts.semantic.semantic_rate_hz)))
    steps = Returning(synthesize_steps(tts, f"♪ {text} ♪", settings, cancel))
    pieces = []
    for item in steps:
        if isinstance(item, Progress):
            yield replace(item, note=f"{label}: {item.note}")
        else:
            pieces.append(item)
    return np.concatenate(pieces), steps.value


class VocalTrack:
    """``samples`` (at ``sample_rate``, ``total`` long) filled line by line as ``until`` asks; each line is
    peak-normalised and cut to its slot, so it writes only inside that slot."""

    def __init__(self, tts: BarkTTS, timeline: list[TimedSection], sample_rate: int, total: int, seed: int,
                 drafting: bool, cancel: CancelToken) -> None:
        self.samples = np.zeros(total, dtype=np.float32)
        self.counts: dict[str, int] = {}
        self.final = 0  # samples[:final] are sung
        self._singing = self._sing(tts, [line for section in timeline for line in section.lines], sample_rate,
                                   seed, drafting, cancel)

    def until(self, sample: int) -> Iterator[Event]:
        """Sing lines until the samples below ``sample`` are final, passing their events on."""
        while self.final < sample:
            item = next(self._singing)
            if isinstance(item, int):
                self.final = item
            else:
                yield item

    def _sing(self, tts: BarkTTS, lines: list[TimedLine], sample_rate: int, seed: int, drafting: bool,
              cancel: CancelToken) -> Iterator[Event | int]:
        """Sing line after line (seed + line index); after each line (and once before the first) yield the
        sample index below which ``samples`` is final."""
        total = self.samples.size
        starts = [min(total, int(round(line.start_s * sample_rate))) for line in lines] + [total]
        yield starts[0]
        for index, line in enumerate(lines):
            cancel.raise_if_cancelled()
            label = f"singing line {index + 1}/{len(lines)}"
            yield Progress(index, len(lines), label)
            sung, output = yield from sing_line(tts, line.text, line.end_s - line.start_s, seed + index, drafting,
                                                cancel, label)
            self.count(output)
            sung = normalise_peak(resample(sung, tts.sample_rate, sample_rate))
            start = starts[index]
            end = min(total, int(round(line.end_s * sample_rate)), start + sung.size)
            self.samples[start:end] = sung[:end - start]
            yield starts[index + 1]

    def count(self, output: BarkOutput) -> None:
        for stage in ("semantic", "coarse"):
            decode = getattr(output, f"{stage}_stats")
            for name, value in (("tokens", decode.new_tokens), ("forwards", decode.forwards)):
                self.counts[f"vocal_{stage}_{name}"] = self.counts.get(f"vocal_{stage}_{name}", 0) + value

    def stats(self) -> dict[str, Any]:
        """Bark's tokens and forwards per AR stage, summed over the lines, and their τ (tokens per forward)."""
        tokens = self.counts["vocal_semantic_tokens"] + self.counts["vocal_coarse_tokens"]
        forwards = self.counts["vocal_semantic_forwards"] + self.counts["vocal_coarse_forwards"]
        return {**self.counts, "vocal_tau": round(tokens / max(forwards, 1), 4)}
