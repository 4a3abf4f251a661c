"""The structure guard: a logits processor that keeps a decoded body inside the tune grammar and the lyrics' plan.

The note model chooses the music (chords, rhythm, pitches); the guard only removes the tokens that would break the
song's shape: sections and lines in the plan's order, a chord after every ``BAR``, a duration after every note or
rest, bars filled exactly, and each sung line carrying exactly its syllable count of notes (no line, section or end
before the count is reached, no further note after it, rests only once the line is sung and only to fill its
bar, a phrase of at least two bars, at most ``MAX_BARS`` bars of chords in an instrumental section). It is a
``LogitsProcessor`` (``processors`` of the decoding core), applied at every verified node exactly as plain decoding
applies it, so drafting stays lossless with it on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .tunes import DURATIONS, Plan, VOCABULARY

IDS = {word: i for i, word in enumerate(VOCABULARY)}
MAX_BARS = 4  # the composer's longest phrase (16 notes in 3/4)
GROUPS = {
    "chord": [IDS[f"C{d}"] for d in range(1, 8)],
    "note": [i for w, i in IDS.items() if w.startswith("N") and w[1:].isdigit()],
}


@dataclass(frozen=True)
class Place:
    """Where the body is: section and line (-1 before the first), notes sung in the line, eighths left in the bar
    (None outside a bar), events in the bar, and what must come next (``expect``)."""
    section: int = -1
    line: int = -1
    notes: int = 0
    left: int | None = None
    events: int = 0
    expect: str = "tag"
    bars: int = 0  # bars begun in this line (or instrumental section)  # tag, line, bar, chord, duration, event, done


class StructureGuard:
    """``guard(ids, scores)``: ``scores`` with every token the plan forbids after ``ids`` set to -inf. ``ids`` is
    the prompt (ending at ``<body>``) and the body so far; places are kept for the longest prefix seen, so a
    verifier walking a tree re-reads only the nodes past the shared prefix."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.eighths = plan.header.bar_eighths
        self.prompt = len(plan.prompt_tokens())
        self.seen: list[int] = []
        self.places: list[Place] = [Place()]
        self.masks: dict[Place, torch.Tensor] = {}

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        body = ids[0, self.prompt:].tolist()
        shared = 0
        limit = min(len(body), len(self.seen))
        if limit:
            same = np.asarray(body[:limit]) == np.asarray(self.seen[:limit])
            shared = limit if same.all() else int(np.argmin(same))
        del self.seen[shared:], self.places[shared + 1:]
        for token in body[shared:]:
            self.places.append(self.step(self.places[-1], VOCABULARY[token]))
            self.seen.append(token)
        place = self.places[-1]
        mask = self.masks.get(place)
        if mask is None:  # built once per place on the scores' device: no copy per verified node
            mask = self.masks[place] = torch.full((len(VOCABULARY),), float("-inf"), device=scores.device)
            mask[self.allowed(place)] = 0.0
        return scores + mask

    def counts(self, place: Place) -> list[int]:
        return self.plan.sections[place.section][1] if 0 <= place.section < len(self.plan.sections) else []

    def after_line(self, place: Place) -> list[int]:
        """What may close a line or an instrumental section: the next line, the next section, or the end."""
        if place.line + 1 < len(self.counts(place)):
            return [IDS["LINE"]]
        if place.section + 1 < len(self.plan.sections):
            return [IDS[f"[{self.plan.sections[place.section + 1][0]}]"]]
        return [IDS["<eos>"]]

    def allowed(self, place: Place) -> list[int]:
        if place.expect == "tag":
            return self.after_line(place) if place.section >= 0 else [IDS[f"[{self.plan.sections[0][0]}]"]]
        if place.expect in ("line", "bar", "chord"):
            return {"line": [IDS["LINE"]], "bar": [IDS["BAR"]], "chord": GROUPS["chord"]}[place.expect]
        if place.expect == "duration":
            return [IDS[f"D{d}"] for d in DURATIONS if d <= (place.left or 0)]
        if place.expect == "done":
            return [IDS["<eos>"]]
        counts = self.counts(place)
        due = counts[place.line] if 0 <= place.line < len(counts) else 0
        if place.notes < due:  # a line sings on until its count: no rest, no empty bar before it (the composer's)
            return GROUPS["note"] if place.left or not place.events else [IDS["BAR"]]
        if not due:  # an instrumental section: bars of chords
            return ([IDS["BAR"]] if place.bars < MAX_BARS else []) + self.after_line(place)
        if place.events:  # a bar once begun is filled, with the rest that closes the phrase; a phrase has 2+ bars
            return [IDS["R"]] if place.left else ([IDS["BAR"]] if place.bars < 2 else []) + self.after_line(place)
        return self.after_line(place)

    def step(self, place: Place, word: str) -> Place:
        """The place after ``word`` (which the mask allowed)."""
        if word.startswith("[") or word == "<eos>":
            expect = "done" if word == "<eos>" else ("line" if self.counts(Place(place.section + 1)) else "bar")
            return Place(place.section + 1, -1, expect=expect)
        if word == "LINE":
            return Place(place.section, place.line + 1, expect="bar")
        if word == "BAR":
            return Place(place.section, place.line, place.notes, self.eighths, 0, "chord", place.bars + 1)
        if word.startswith("C"):
            return replace(place, events=0, expect="event")
        if word.startswith("N") or word == "R":
            return replace(place, notes=place.notes + (word != "R"), expect="duration")
        if word.startswith("D"):
            return replace(place, left=(place.left or 0) - int(word[1:]), events=place.events + 1, expect="event")
        return place
