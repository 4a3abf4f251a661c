"""Micro-song's symbolic tune language and the procedural composer whose tunes the note model is trained on.

A tune is a prompt then a body, one word per token:

    <bos> K_D MIN M3 T_slow [verse] S7 S8 [chorus] S5 S5 [outro] <body>
    [verse] LINE BAR C1 N7 D2 N8 D1 ... BAR C5 ... R D2 LINE ... [chorus] ... [outro] BAR C4 BAR C1 <eos>

The prompt is the style (key, major/minor, meter, tempo bucket) and the lyrics' structure (section tags, each sung
line's syllable count); the model writes the body: per line a phrase of whole bars, a chord per bar (``C1``..``C7``,
the diatonic triad on that scale degree) and exactly one note per syllable (``N<step>`` a scale step counted from
a fifth below the tonic, then ``D<eighths>``), a rest closing the phrase. Pitches and chords are relative to the
key, so the same melody reads the same in every key. The composer writes what pop and folk songs do: a chorus
sings the same melody every time it recurs, verses share theirs, a section cadences on the tonic chord and note.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..audio.lyrics import Section, parse_sections

KEYS = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
TAGS = ("intro", "verse", "prechorus", "chorus", "bridge", "inst", "outro")
TEMPOS = {"slow": 72, "mid": 100, "fast": 132}  # the bucket's bpm when the style names none
DURATIONS = (1, 2, 3, 4, 6, 8)  # eighth notes
MAX_SYLLABLES = 16
LOWEST_STEP = -5  # N0 is a fifth below the tonic
STEPS = 15  # N0..N14: up to a tenth above the tonic
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>", "<body>")
VOCABULARY = (*SPECIAL, *(f"K_{k}" for k in KEYS), "MAJ", "MIN", "M3", "M4", *(f"T_{t}" for t in TEMPOS),
              *(f"[{t}]" for t in TAGS), *(f"S{n}" for n in range(1, MAX_SYLLABLES + 1)), "LINE", "BAR", "R",
              *(f"C{d}" for d in range(1, 8)), *(f"N{s}" for s in range(STEPS)), *(f"D{d}" for d in DURATIONS))

# Style words and what they set (a later word wins): the header a user's free-text style maps to.
STYLE_WORDS = {
    "major": {"mode": "MAJ"}, "happy": {"mode": "MAJ"}, "bright": {"mode": "MAJ"}, "sunny": {"mode": "MAJ"},
    "minor": {"mode": "MIN"}, "sad": {"mode": "MIN"}, "melancholy": {"mode": "MIN"}, "dark": {"mode": "MIN"},
    "waltz": {"meter": "M3", "tempo": "mid"}, "lullaby": {"meter": "M3", "tempo": "slow"},
    "march": {"meter": "M4", "tempo": "fast", "mode": "MAJ"}, "folk": {"meter": "M4", "tempo": "mid"},
    "ballad": {"tempo": "slow"}, "slow": {"tempo": "slow"}, "gentle": {"tempo": "slow"}, "calm": {"tempo": "slow"},
    "fast": {"tempo": "fast"}, "upbeat": {"tempo": "fast"}, "dance": {"tempo": "fast", "meter": "M4"},
}
# Progressions per section kind (scale degrees, one per bar); a section's last bar is always the tonic.
PROGRESSIONS = {
    "verse": ((1, 5, 6, 4), (1, 4, 5, 1), (6, 4, 1, 5), (1, 6, 4, 5)),
    "prechorus": ((4, 5, 6, 5), (2, 5, 4, 5)),
    "chorus": ((4, 1, 5, 6), (1, 5, 6, 4), (1, 4, 1, 5), (4, 5, 1, 6)),
    "bridge": ((6, 4, 1, 5), (2, 5, 6, 4), (4, 4, 5, 5)),
}
CHORD_TONES = (0, 2, 4)


@dataclass
class Header:
    key: str = "C"
    mode: str = "MAJ"
    meter: str = "M4"
    tempo: str = "mid"
    bpm: float = 100.0

    @property
    def tokens(self) -> list[str]:
        return [f"K_{self.key}", self.mode, self.meter, f"T_{self.tempo}"]

    @property
    def bar_eighths(self) -> int:
        return 6 if self.meter == "M3" else 8


def style_header(style: str, rng: random.Random) -> Header:
    """The header a free-text style asks for: words from ``STYLE_WORDS``, a key name ("in D minor"), a bpm; what
    the style leaves open is drawn from ``rng`` (the request's seed)."""
    words = re.findall(r"[a-z#]+|\d+", style.lower())
    chosen: dict[str, str] = {}
    for word in words:
        chosen.update(STYLE_WORDS.get(word, {}))
    key = re.search(r"\b(?:in\s+)?([a-g])(b|#)?\s+(major|minor)\b", style.lower())
    bpm_match = re.search(r"(\d{2,3})\s*bpm", style.lower())
    bpm = float(bpm_match.group(1)) if bpm_match else None
    if bpm is not None:
        chosen["tempo"] = "slow" if bpm < 86 else "mid" if bpm < 116 else "fast"
    header = Header(key=rng.choice(KEYS), mode=chosen.get("mode", rng.choice(("MAJ", "MAJ", "MIN"))),
                    meter=chosen.get("meter", rng.choice(("M4", "M4", "M3"))),
                    tempo=chosen.get("tempo", rng.choice(tuple(TEMPOS))))
    if key:
        name = {"#": {"C": "Db", "D": "Eb", "F": "Gb", "G": "Ab", "A": "Bb"}}.get(key.group(2) or "", {})
        letter = key.group(1).upper()
        header.key = name.get(letter, letter + ("b" if key.group(2) == "b" else ""))
        header.key = header.key if header.key in KEYS else {"Cb": "B", "Fb": "E"}.get(header.key, "C")
        header.mode = "MIN" if key.group(3) == "minor" else "MAJ"
    header.bpm = min(max(bpm, 50.0), 180.0) if bpm is not None else float(TEMPOS[header.tempo])
    return header


# ---- syllables -------------------------------------------------------------------------------------------------
VOWEL_GROUP = re.compile(r"[aeiouy]+")


def word_syllables(word: str) -> list[str]:
    """A word's syllables as their vowel spellings ("morning" -> ["o", "i"]): vowel groups, a silent final e
    dropped (not in "-le"), at least one per word. Approximate, like every rule-based counter; good enough to
    give each sung syllable a note and a vowel to sing."""
    word = re.sub(r"[^a-z]", "", word.lower())
    if not word:
        return []
    groups = VOWEL_GROUP.findall(word)
    if len(groups) > 1 and word.endswith("e") and not word.endswith(("le", "ee", "ye")) and groups[-1] == "e":
        groups = groups[:-1]
    if len(groups) > 1 and word.endswith("es") and not word.endswith(("ses", "zes", "ches", "shes", "ges", "ces")):
        groups = groups[:-1]
    return groups or ["a"]


@dataclass
class Syllable:
    vowel: str  # the vowel spelling ("ou", "a")
    onset: str  # the consonants before it ("", "s", "th")


def line_syllables(line: str) -> list[Syllable]:
    """A lyric line as sung syllables (vowel and onset consonants), at most ``MAX_SYLLABLES`` (the rest merge
    into the last)."""
    syllables: list[Syllable] = []
    for word in re.findall(r"[A-Za-z']+", line):
        clean = re.sub(r"[^a-z]", "", word.lower())
        vowels = word_syllables(word)
        position = 0
        for vowel in vowels:
            start = clean.find(vowel, position)
            syllables.append(Syllable(vowel, clean[position:start] if start >= 0 else ""))
            position = start + len(vowel) if start >= 0 else position
    return syllables[:MAX_SYLLABLES] if syllables else [Syllable("a", "")]


def syllable_count(line: str) -> int:
    return len(line_syllables(line))


def section_kind(tag: str) -> str:
    """A lyrics tag ("Verse 2", "Pre-Chorus", "hook") as one of ``TAGS``."""
    tag = tag.lower()
    for words, kind in ((("pre",), "prechorus"), (("chorus", "refrain", "hook"), "chorus"), (("bridge",), "bridge"),
                        (("intro",), "intro"), (("outro", "coda", "end"), "outro"),
                        (("inst", "solo", "break"), "inst")):
        if any(word in tag for word in words):
            return kind
    return "verse"


@dataclass
class Plan:
    """What the prompt says: the header and, per section, its kind and its lines' syllable counts."""
    header: Header
    sections: list[tuple[str, list[int]]] = field(default_factory=list)

    def prompt_tokens(self) -> list[str]:
        tokens = ["<bos>", *self.header.tokens]
        for kind, counts in self.sections:
            tokens += [f"[{kind}]", *(f"S{n}" for n in counts)]
        return tokens + ["<body>"]


def plan_song(lyrics: str | list[Section], header: Header) -> Plan:
    sections = parse_sections(lyrics) if isinstance(lyrics, str) else lyrics
    return Plan(header, [(section_kind(s.tag), [syllable_count(line) for line in s.lines]) for s in sections])


# ---- the composer ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def bar_rhythms(eighths: int, notes: int) -> tuple[tuple[int, ...], ...]:
    """Every way to fill ``eighths`` with ``notes`` durations from ``DURATIONS``."""
    if notes == 0:
        return ((),) if eighths == 0 else ()
    return tuple((d, *rest) for d in DURATIONS if d <= eighths for rest in bar_rhythms(eighths - d, notes - 1))


def rhythm_weight(rhythm: tuple[int, ...]) -> float:
    """Prefer notes that start on the beat (even eighths) and long notes last."""
    onsets, position = 0, 0
    for duration in rhythm:
        onsets += position % 2 == 0
        position += duration
    return (1 + onsets) ** 2 * (1.5 if rhythm and rhythm[-1] >= max(rhythm) else 1.0)


def phrase_rhythm(count: int, eighths: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Bars of durations carrying ``count`` notes, the last bar closing with room for a rest: 2 bars, 4 when the
    notes do not fit."""
    bars = 2 if count <= 2 * eighths - 1 else 4
    per_bar = [count // bars + (i < count % bars) for i in range(bars)]
    if per_bar[-1] == 0:  # one or few notes: sing them in the first bar, keep the rest for the last
        per_bar = [count] + [0] * (bars - 1)
    rhythms = []
    for i, notes in enumerate(per_bar):
        last = i == bars - 1
        room = eighths - (1 if last and notes < eighths else 0)
        room -= rng.choice((0, 1)) if last and notes < eighths - 1 else 0
        options = bar_rhythms(room, notes) if notes else ((),)
        while not options:  # no note of 5 or 7 eighths: the closing rest grows
            room -= 1
            options = bar_rhythms(room, notes)
        rhythms.append(rng.choices(options, weights=[rhythm_weight(r) for r in options])[0])
    return rhythms


def nearest_chord_tone(step: int, chord: int, rng: random.Random) -> int:
    tones = [s for s in range(-3, 10) if (s - (chord - 1)) % 7 in CHORD_TONES]
    best = min(abs(s - step) for s in tones)
    return rng.choice([s for s in tones if abs(s - step) == best])


def phrase_melody(rhythm: list[tuple[int, ...]], chords: list[int], cadence: bool,
                  rng: random.Random) -> list[list[int]]:
    """Scale steps per bar: chord tones on the beat, steps and leaps of a third between, ending on a chord tone
    (the tonic when the phrase ``cadence``s)."""
    step = rng.choice((2, 4, 4, 7))
    bars: list[list[int]] = []
    for durations, chord in zip(rhythm, chords):
        notes, position = [], 0
        for duration in durations:
            if position % 4 == 0:
                step = nearest_chord_tone(step + rng.choice((-2, -1, 0, 1, 2)), chord, rng)
            else:
                step = min(9, max(-3, step + rng.choice((-2, -1, -1, 1, 1, 2, 0))))
            notes.append(step)
            position += duration
        bars.append(notes)
    last = next((b for b in reversed(bars) if b), None)
    if last is not None:
        tonic = 0 if abs(last[-1]) < abs(last[-1] - 7) else 7
        last[-1] = tonic if cadence else nearest_chord_tone(last[-1], chords[-1], rng)
    return bars


def section_chords(kind: str, bars: int, end: bool, rng: random.Random) -> list[int]:
    progression = rng.choice(PROGRESSIONS.get(kind, PROGRESSIONS["verse"]))
    chords = [progression[i % len(progression)] for i in range(bars)]
    if end:
        chords[-1] = 1
    return chords


def compose_body(plan: Plan, rng: random.Random) -> list[str]:
    """The body tokens of a tune for ``plan``: phrases remembered by (section kind, line, syllables), so recurring
    sections sing what they sang before; chords cycle the section's progression and cadence on the tonic."""
    eighths = plan.header.bar_eighths
    remembered: dict[tuple, tuple[list, list, list]] = {}
    progressions: dict[str, int] = {}
    tokens: list[str] = []
    for kind, counts in plan.sections:
        tokens.append(f"[{kind}]")
        if not counts:
            chords = (5, 1) if kind == "intro" else (4, 1) if kind == "outro" else (6, 4, 5, 1)
            tokens += [t for chord in chords for t in ("BAR", f"C{chord}")]
            continue
        seed = progressions.setdefault(kind, rng.randrange(1 << 30))
        for index, count in enumerate(counts):
            last_line = index == len(counts) - 1
            key = (kind, index, count, last_line)
            if key not in remembered:
                local = random.Random(hash((seed, index, count, last_line)) & 0xFFFFFFFF)
                rhythm = phrase_rhythm(count, eighths, local)
                chords = section_chords(kind, len(rhythm), last_line, random.Random(seed + index))
                remembered[key] = (rhythm, chords, phrase_melody(rhythm, chords, last_line, local))
            rhythm, chords, melody = remembered[key]
            tokens += line_tokens(rhythm, chords, melody, eighths)
    return tokens + ["<eos>"]


def line_tokens(rhythm: list[tuple[int, ...]], chords: list[int], melody: list[list[int]], eighths: int) -> list[str]:
    tokens = ["LINE"]
    for durations, chord, steps in zip(rhythm, chords, melody):
        tokens += ["BAR", f"C{chord}"]
        for duration, step in zip(durations, steps):
            tokens += [f"N{step - LOWEST_STEP}", f"D{duration}"]
        rest = eighths - sum(durations)
        if durations and rest:
            tokens += ["R", f"D{rest}"]
    return tokens


def random_plan(rng: random.Random) -> Plan:
    """A song shape for training: 2-6 sections in a pop/folk order, 1-4 lines of 2-16 syllables."""
    header = style_header("", rng)
    shape = rng.choice((("verse", "chorus"), ("intro", "verse", "chorus", "verse", "chorus"),
                        ("verse", "verse", "chorus", "outro"), ("verse", "prechorus", "chorus", "bridge", "chorus"),
                        ("intro", "verse", "chorus", "outro"), ("verse", "chorus", "bridge", "chorus", "outro"),
                        ("chorus",), ("verse",), ("inst", "verse", "chorus")))
    lines: dict[str, list[int]] = {}
    sections = []
    for kind in shape:
        if kind in ("intro", "outro", "inst") and rng.random() < 0.8:
            sections.append((kind, []))
            continue
        if kind not in lines or (kind == "verse" and rng.random() < 0.3):
            lines[kind] = [rng.choice((2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 10, 11, 12, 14, 16))
                           for _ in range(rng.randint(1, 4))]
        sections.append((kind, list(lines[kind])))
    return Plan(header, sections)


def compose(plan: Plan, rng: random.Random) -> list[str]:
    """A whole training tune: prompt then body."""
    return plan.prompt_tokens() + compose_body(plan, rng)


# ---- reading a body back ---------------------------------------------------------------------------------------
@dataclass
class Bar:
    """One decoded bar: where it sits (section, line; line -1 in an instrumental section), its chord, and its
    events as (scale step or None for a rest, eighths)."""
    section: int
    kind: str
    line: int
    chord: int = 1
    events: list[tuple[int | None, int]] = field(default_factory=list)

    @property
    def notes(self) -> list[int]:
        return [step for step, _ in self.events if step is not None]


class BodyReader:
    """Reads body tokens one at a time and hands back each bar once it is complete (the next bar, line or
    section begins, or the tune ends), so audio can follow the decoder bar by bar. Tolerant: a token out of
    place is skipped (a random-weight model writes anything); ``check_body`` is the strict reading."""

    def __init__(self) -> None:
        self.section, self.kind, self.line = -1, "verse", -1
        self.bar: Bar | None = None
        self.pitch: int | None = None
        self.rest = False

    def feed(self, token: str) -> list[Bar]:
        done: list[Bar] = []
        if token in ("BAR", "LINE", "<eos>") or token.startswith("["):
            done = self.close()
        if token.startswith("[") and token[1:-1] in TAGS:
            self.section, self.kind, self.line = self.section + 1, token[1:-1], -1
        elif token == "LINE":
            self.line += 1
        elif token == "BAR":
            self.bar = Bar(max(self.section, 0), self.kind, self.line)
        elif self.bar is not None and token.startswith("C") and token[1:].isdigit():
            self.bar.chord = min(max(int(token[1:]), 1), 7)
        elif token.startswith("N") and token[1:].isdigit():
            self.pitch, self.rest = int(token[1:]) + LOWEST_STEP, False
        elif token == "R":
            self.pitch, self.rest = None, True
        elif (self.bar is not None and token[:1] == "D" and token[1:].isdigit()
              and (self.pitch is not None or self.rest)):
            self.bar.events.append((self.pitch, int(token[1:])))
            self.pitch, self.rest = None, False
        return done

    def close(self) -> list[Bar]:
        bar, self.bar = self.bar, None
        return [bar] if bar is not None else []


def check_body(tokens: list[str], plan: Plan) -> dict[str, int | bool]:
    """The strict reading of a decoded body against its plan: ``parsed`` (the grammar holds, the sections and
    lines are the plan's, every bar is full, it ends with ``<eos>``), and how many sung lines carry exactly
    their syllable count of notes (``lines_matched`` of ``lines``)."""
    expected = sum(len(counts) for _, counts in plan.sections)
    bars: list[Bar] = []
    reader = BodyReader()
    grammar = tokens[-1:] == ["<eos>"] and all(t in VOCABULARY for t in tokens)
    for previous, token in zip(["<body>", *tokens], tokens):
        grammar &= (token.startswith("D") == (previous.startswith("N") or previous == "R"))
        grammar &= (token.startswith("C") == (previous == "BAR"))
        bars += reader.feed(token)
    eighths = plan.header.bar_eighths
    grammar &= all(sum(d for _, d in bar.events) in (0, eighths) for bar in bars)
    sections = [t[1:-1] for t in tokens if t.startswith("[")]
    grammar &= sections == [kind for kind, _ in plan.sections]
    notes: dict[tuple[int, int], int] = {}
    for bar in bars:
        if bar.line >= 0:
            notes[(bar.section, bar.line)] = notes.get((bar.section, bar.line), 0) + len(bar.notes)
    wanted = {(s, i): n for s, (_, counts) in enumerate(plan.sections) for i, n in enumerate(counts)}
    grammar &= set(notes) == set(wanted)
    matched = sum(notes.get(place, -1) == n for place, n in wanted.items())
    return {"parsed": bool(grammar), "lines": expected, "lines_matched": matched}
