"""A whole micro-song: lyrics and style to a plan, the note model's body decoded through the decoding core, and
each bar rendered the moment the decoder completes it (the song tab's ``offline`` mode streams these)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Generator

import numpy as np

from ..audio.lyrics import parse_sections
from ..audio.pcm import AudioChunk, mix_stems
from ..base import CancelToken, Event, Partial, Progress
from ..decoding.plain import DecodeStats, SamplingConfig
from ..streaming import Returning
from .decode import decode_body, max_body_tokens
from .model import NoteModel
from .render import SAMPLE_RATE, SongRenderer
from .tunes import BodyReader, Plan, check_body, line_syllables, plan_song, style_header

ORGAN_WORDS = ("organ", "pad", "hymn", "church", "choir", "drone")


@dataclass
class Take:
    """A decoded and rendered micro-song: its plan, the body tokens, both stems and the decoder's counts."""
    plan: Plan
    tokens: list[str]
    vocals: np.ndarray
    accompaniment: np.ndarray
    stats: DecodeStats
    decode_s: float
    bars: int
    check: dict[str, Any] = field(default_factory=dict)
    first_audio_s: float | None = None  # from the request's start to the first streamed chunk

    def describe(self, elapsed: float) -> dict[str, Any]:
        """The take's measured and structural numbers, for the tab's stats (``elapsed``: the request's wall time)."""
        header, audio_s = self.plan.header, self.vocals.size / SAMPLE_RATE
        return {"audio_s": round(audio_s, 3), "sample_rate": SAMPLE_RATE, "time_s": round(elapsed, 4),
                "rtf": round(elapsed / audio_s, 4) if audio_s else 0.0,
                "time_to_first_audio_s": round(self.first_audio_s if self.first_audio_s is not None else elapsed, 4),
                "key": f"{header.key} {'minor' if header.mode == 'MIN' else 'major'}",
                "meter": "3/4" if header.meter == "M3" else "4/4", "bpm": header.bpm, "bars": self.bars,
                "forwards": self.stats.forwards, "new_tokens": self.stats.new_tokens,
                "tau": round(self.stats.tau, 4), "decode_s": round(self.decode_s, 4),
                "parsed": self.check["parsed"], "sung_lines": self.check["lines"],
                "lines_matching_syllables": self.check["lines_matched"]}


def stream_song(note: NoteModel, lyrics: str, style: str, sampling: SamplingConfig, draft: bool, seed: int,
                cancel: CancelToken | None = None) -> Generator[Progress | tuple[np.ndarray, np.ndarray], None, Take]:
    """Yields a Progress per decoder forward and (vocals, accompaniment) per bar as soon as the bar is complete
    (then the final tail); returns the whole ``Take``. The style's open choices (key, meter, tempo) are drawn
    from ``seed``."""
    sections = parse_sections(lyrics)
    plan = plan_song(sections, style_header(style, random.Random(seed)))
    syllables = {(s, i): line_syllables(line)
                 for s, section in enumerate(sections) for i, line in enumerate(section.lines)}
    sound = "organ" if any(word in style.lower() for word in ORGAN_WORDS) else "pluck"
    renderer = SongRenderer(plan.header, syllables, sound)
    reader, stats, limit = BodyReader(), DecodeStats(), max_body_tokens(plan)
    tokens: list[str] = []
    stems: list[tuple[np.ndarray, np.ndarray]] = []

    def rendered(bar_or_tail) -> tuple[np.ndarray, np.ndarray]:
        stems.append(renderer.bar(bar_or_tail) if bar_or_tail is not None else renderer.finish())
        return stems[-1]

    decode_s, started = 0.0, time.perf_counter()
    for run in decode_body(note, plan, sampling, draft, True, cancel, stats):
        decode_s += time.perf_counter() - started
        tokens += run
        yield Progress(len(tokens), limit, "decoding notes")
        for bar in (bar for token in run for bar in reader.feed(token)):
            yield rendered(bar)
        started = time.perf_counter()
    for bar in reader.close():  # a body cut off by the token cap still sounds its last bar
        yield rendered(bar)
    bars = len(stems)
    yield rendered(None)  # the last chord's ring
    vocals, accompaniment = (np.concatenate(stem) for stem in zip(*stems))
    return Take(plan, tokens, vocals, accompaniment, stats, decode_s, bars, check_body(tokens, plan))


def stream_events(note: NoteModel, lyrics: str, style: str, sampling: SamplingConfig, draft: bool, seed: int,
                  cancel: CancelToken | None, started: float) -> Generator[Event, None, Take]:
    """``stream_song`` as the tab's events: Progress per forward, each bar's mix as a ``Partial(AudioChunk)``
    (``mix_stems`` is per sample, so the chunks are exactly the final mix). ``started``: the request's start."""
    stream = Returning(stream_song(note, lyrics, style, sampling, draft, seed, cancel))
    index, first_audio_s = 0, None
    for item in stream:
        if isinstance(item, Progress):
            yield item
            continue
        first_audio_s = first_audio_s if first_audio_s is not None else time.perf_counter() - started
        yield Partial(AudioChunk(mix_stems(*item)[2], SAMPLE_RATE, index))
        index += 1
    stream.value.first_audio_s = first_audio_s
    return stream.value
