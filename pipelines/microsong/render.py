"""Micro-song's synthesiser: decoded bars to audio with numpy, bar by bar, so a song streams while it is decoded.

Two stems, as the dual-track mode has: an accompaniment (a bass on the strong beats and the bar's chord, plucked as
an arpeggio, or held as an organ when the style says organ/pad/hymn) and vocals from a formant synthesiser: each
syllable's vowel sung on its melody note (a glottal-like harmonic source, vibrato, three vowel formants, a breath
of noise for the onset consonants). It is plainly a synthesiser, not a singer. Every note fades in and out, and a
note's tail that outlasts its bar is carried into the next bar's buffer, so the streamed bars concatenate to
exactly the one-shot render with no seam.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .tunes import KEYS, Bar, Header, Syllable

SAMPLE_RATE = 24000
TAIL_S = 1.5  # the longest tail a note leaves after its bar (a plucked chord tone's decay)
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
# Vowel formants (Hz) and bandwidths: Peterson & Barney's averages, rounded.
FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410),
            "u": (300, 870, 2240), "uh": (640, 1190, 2390), "ai": (660, 1720, 2410)}
BANDWIDTHS = (80.0, 100.0, 140.0)
VOWEL_SPELLINGS = {"ee": "i", "ea": "i", "ie": "i", "y": "i", "oo": "u", "ou": "o", "ow": "o", "oa": "o", "ai": "ai",
                   "ay": "ai", "ei": "ai", "ey": "ai", "au": "o", "aw": "o", "oi": "o", "oy": "o", "u": "uh",
                   "a": "a", "e": "e", "i": "i", "o": "o"}
NOISY_ONSETS = set("sfhzctkpx")
VOCAL_LEVEL, BASS_LEVEL, CHORD_LEVEL = 0.32, 0.30, 0.12


def vowel_of(spelling: str) -> str:
    return VOWEL_SPELLINGS.get(spelling[:2], VOWEL_SPELLINGS.get(spelling[:1], "a"))


def midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69.0) / 12.0)


def fade(length: int, attack: int, release: int) -> np.ndarray:
    """A raised-cosine attack and release over ``length`` samples: every note starts and ends at zero."""
    envelope = np.ones(length, dtype=np.float32)
    attack, release = min(attack, length // 2), min(release, length // 2)
    if attack:
        envelope[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, attack, endpoint=False))
    if release:
        envelope[length - release:] *= 0.5 + 0.5 * np.cos(np.linspace(0, math.pi, release))
    return envelope


def pluck(hz: float, seconds: float, level: float) -> np.ndarray:
    """A plucked string: harmonics decaying faster the higher they are."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    k = np.arange(1, 9)[:, None]
    k = k[(k[:, 0] * hz) < SAMPLE_RATE / 2.5]
    tone = (np.sin(2 * np.pi * hz * k * t) * np.exp(-t * (2.5 + 1.6 * k)) / k).sum(0)
    return (level * tone * fade(t.size, int(0.004 * SAMPLE_RATE), int(0.05 * SAMPLE_RATE))).astype(np.float32)


def organ(hz: float, seconds: float, level: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * hz * t) + 0.5 * np.sin(4 * np.pi * hz * t) + 0.25 * np.sin(6 * np.pi * hz * t)
    return (0.6 * level * tone * fade(t.size, int(0.03 * SAMPLE_RATE), int(0.12 * SAMPLE_RATE))).astype(np.float32)


def sing(hz: float, seconds: float, syllable: Syllable, seed: int) -> np.ndarray:
    """One sung syllable: harmonics of a vibrato'd f0 weighted by the vowel's formant envelope, and a short noise
    burst for a hissed or stopped onset."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    vibrato = 1.0 + 0.012 * np.sin(2 * np.pi * 5.5 * t) * np.clip((t - 0.15) / 0.2, 0.0, 1.0)
    phase = 2 * np.pi * np.cumsum(hz * vibrato) / SAMPLE_RATE
    harmonics = np.arange(1, int(4500 / hz) + 1)
    frequencies = harmonics * hz
    envelope = sum(g / (1 + ((frequencies - f) / (b / 2)) ** 2)
                   for g, f, b in zip((1.0, 0.6, 0.3), FORMANTS[vowel_of(syllable.vowel)], BANDWIDTHS))
    weights = envelope * harmonics ** -0.6
    voice = (weights[:, None] * np.sin(harmonics[:, None] * phase[None])).sum(0) / max(weights.sum(), 1e-6) * 2.2
    voice *= fade(n, int(0.03 * SAMPLE_RATE), int(0.06 * SAMPLE_RATE))
    onset = syllable.onset[:1]
    if onset in NOISY_ONSETS:
        burst = min(n, int(0.05 * SAMPLE_RATE))
        noise = np.diff(np.random.default_rng(seed).standard_normal(burst + 1))  # high-passed: a hiss
        voice[:burst] += 0.25 * noise * fade(burst, burst // 4, burst // 2)
    return (VOCAL_LEVEL * voice).astype(np.float32)


@dataclass
class SongRenderer:
    """Renders bars in order. ``lyrics[(section, line)]`` are the syllables each sung line carries; ``bar`` returns
    the bar's own span of (vocals, accompaniment) and keeps what rings on; ``finish`` returns that last tail."""

    header: Header
    lyrics: dict[tuple[int, int], list[Syllable]]
    sound: str = "pluck"
    clock: float = 0.0  # seconds rendered so far (bar starts are rounded from it, so bars never drift)
    carried: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.float32),) * 2)
    sung: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        offset = KEYS.index(self.header.key)
        self.tonic = 48 + offset if offset >= 6 else 60 + offset  # the melody's tonic, F#3..F4
        self.scale = MINOR if self.header.mode == "MIN" else MAJOR
        self.eighth_s = 30.0 / self.header.bpm

    def pitch(self, step: int, base: int) -> int:
        return base + 12 * (step // 7) + self.scale[step % 7]

    def span(self) -> tuple[int, int]:
        """The next bar's first and end sample (rounded from the running clock, so bars never drift)."""
        eighths = self.header.bar_eighths
        start, end = round(self.clock * SAMPLE_RATE), round((self.clock + eighths * self.eighth_s) * SAMPLE_RATE)
        self.clock += eighths * self.eighth_s
        return start, end

    def bar(self, bar: Bar) -> tuple[np.ndarray, np.ndarray]:
        """The bar's own span of (vocals, accompaniment); what rings on is carried into the next bar."""
        start, end = self.span()
        length = end - start
        vocals, accompaniment = (np.zeros(length + int(TAIL_S * SAMPLE_RATE), np.float32) for _ in range(2))
        for buffer, tail in zip((vocals, accompaniment), self.carried):
            buffer[:tail.size] += tail
        self.accompany(bar, accompaniment, 0)
        self.melody(bar, vocals, 0, start)
        self.carried = (vocals[length:], accompaniment[length:])
        return vocals[:length], accompaniment[:length]

    def render(self, bars: list[Bar]) -> tuple[np.ndarray, np.ndarray]:
        """Every bar in one timeline at once: what the streamed bars and ``finish`` concatenate to."""
        spans = [self.span() for _ in bars]
        total = (spans[-1][1] if spans else 0) + int(TAIL_S * SAMPLE_RATE)
        vocals, accompaniment = np.zeros(total, np.float32), np.zeros(total, np.float32)
        for bar, (start, _) in zip(bars, spans):
            self.accompany(bar, accompaniment, start)
            self.melody(bar, vocals, start, start)
        return vocals, accompaniment

    def accompany(self, bar: Bar, buffer: np.ndarray, offset: int) -> None:
        """Bass on the strong beats, the chord as an arpeggio of eighths (4/4) or on beats 2 and 3 (3/4), into
        ``buffer`` from sample ``offset``."""
        root = bar.chord - 1
        triad = [self.pitch(root + i, self.tonic - 12) for i in (0, 2, 4)]
        bass = midi_hz(self.pitch(root, self.tonic - 24))
        eighths = self.header.bar_eighths
        for position in range(0, eighths, 4 if eighths == 8 else 6):
            add(buffer, offset + int(position * self.eighth_s * SAMPLE_RATE), pluck(bass, 1.2, BASS_LEVEL))
        if self.sound == "organ":
            for note in triad:
                add(buffer, offset, organ(midi_hz(note), eighths * self.eighth_s, CHORD_LEVEL))
            return
        pattern = [0, 1, 2, 1, 0, 1, 2, 1] if eighths == 8 else [None, None, 0, 1, 2, 1]
        for position, index in enumerate(pattern):
            if index is not None:
                at = offset + int(position * self.eighth_s * SAMPLE_RATE)
                add(buffer, at, pluck(midi_hz(triad[index] + 12 * (position % 4 == 2)), 1.0, CHORD_LEVEL))

    def melody(self, bar: Bar, buffer: np.ndarray, offset: int, start: int) -> None:
        """Each note sings the line's next syllable (extra notes hold the last vowel; a rest is silence) into
        ``buffer`` from ``offset``; ``start`` (the bar's first sample in the song) seeds the consonants' noise. A bar
        whose durations overrun it (an unguarded model) is squeezed to fit."""
        if bar.line < 0:
            return
        place = (bar.section, bar.line)
        syllables = self.lyrics.get(place) or [Syllable("a", "")]
        total = sum(d for _, d in bar.events) or 1
        scale = min(1.0, self.header.bar_eighths / total)
        position = 0.0
        for step, eighths in bar.events:
            seconds = eighths * scale * self.eighth_s
            if step is not None:
                index = self.sung.get(place, 0)
                self.sung[place] = index + 1
                syllable = syllables[min(index, len(syllables) - 1)]
                hz = midi_hz(self.pitch(step, self.tonic))
                voice = sing(hz, max(seconds * 0.95, 0.06), syllable, start + index)
                add(buffer, offset + int(position * self.eighth_s * SAMPLE_RATE), voice)
            position += eighths * scale

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """What still rings after the last bar (the final chord's decay), then silence."""
        vocals, accompaniment = self.carried
        self.carried = (np.zeros(0, np.float32),) * 2
        return vocals, accompaniment


def add(buffer: np.ndarray, offset: int, sound: np.ndarray) -> None:
    end = min(buffer.size, offset + sound.size)
    if end > offset:
        buffer[offset:end] += sound[:end - offset]
