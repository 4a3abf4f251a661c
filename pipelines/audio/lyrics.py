"""Song lyrics: ``[tag]`` sections and where each sung line sits on the song's timeline.

Pure Python (no torch), so the song tab's vocal track, its sidecar and the UI share one reading of the lyrics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

INSTRUMENTAL_WEIGHT = 1.0  # an untexted section gets the time of one sung line
SECTION_TAG = re.compile(r"^\s*\[([^\[\]]+)\]\s*$")
EXAMPLE_LYRICS = """[intro]

[verse]
Morning light on the harbour wall
Gulls are singing over it all

[chorus]
Sail away, sail away
Into the blue of a brand new day

[outro]
"""


@dataclass
class Section:
    tag: str
    lines: list[str] = field(default_factory=list)

    @property
    def instrumental(self) -> bool:
        return not self.lines


def parse_sections(lyrics: str) -> list[Section]:
    """Split lyrics at ``[tag]`` lines. Tags are lower-cased and may carry a number (``[Verse 2]``); text before
    the first tag is a verse; blank lines are dropped; a tag without lines is an instrumental section."""
    sections: list[Section] = []
    for raw in lyrics.splitlines():
        line = raw.strip()
        if not line:
            continue
        tag = SECTION_TAG.match(line)
        if tag:
            sections.append(Section(" ".join(tag.group(1).lower().split())))
            continue
        if not sections:
            sections.append(Section("verse"))
        sections[-1].lines.append(line)
    return sections


@dataclass
class TimedLine:
    text: str
    start_s: float
    end_s: float


@dataclass
class TimedSection:
    tag: str
    start_s: float
    end_s: float
    lines: list[TimedLine]


def plan_timeline(sections: list[Section], duration_s: float) -> list[TimedSection]:
    """Map sections to time on the accompaniment: each sung line weighs 1, an instrumental section
    ``INSTRUMENTAL_WEIGHT``; a section's lines share its span equally."""
    weights = [len(s.lines) or INSTRUMENTAL_WEIGHT for s in sections]
    total = sum(weights)
    timed: list[TimedSection] = []
    start = 0.0
    for section, weight in zip(sections, weights):
        end = start + duration_s * weight / total
        slot = (end - start) / max(len(section.lines), 1)
        lines = [TimedLine(text, start + i * slot, start + (i + 1) * slot) for i, text in enumerate(section.lines)]
        timed.append(TimedSection(section.tag, start, end, lines))
        start = end
    return timed


def describe_timeline(timeline: list[TimedSection]) -> list[dict[str, Any]]:
    """The timeline as JSON-ready rows (times rounded to the millisecond), for the result's metadata."""
    return [{"tag": s.tag, "start_s": round(s.start_s, 3), "end_s": round(s.end_s, 3),
             "lines": [{"text": ln.text, "start_s": round(ln.start_s, 3), "end_s": round(ln.end_s, 3)}
                       for ln in s.lines]}
            for s in timeline]
