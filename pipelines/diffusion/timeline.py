"""Shot timeline: time-variable prompts (Phenaki) with a transition per shot boundary (ShotAdapter's shots).

A timeline is a list of shots ``(start_frame, prompt)``; each shot after the first says how it begins:

- ``smooth``: the text embedding moves linearly from the previous shot's to this shot's across a window of
  ``smooth_window`` frames centred on the boundary (FreeNoise's prompt interpolation, confined to a window).
- ``cut``: a step function. Every frame carries exactly one shot's embedding, so a shot's text reaches only
  its own frames through the spatial cross-attention (ShotAdapter's shot-local text mask; without its
  fine-tuned transition tokens, which have no public weights).

The timeline compiles to diffusers FreeNoise's ``{frame: prompt}`` keyframe dict: a transition is two
keyframes, the last frame that is purely the old shot and the first that is purely the new one, so
FreeNoise's per-segment interpolation produces exactly the mixing weights ``frame_mix`` describes. Pure
Python (no torch) so the UI can validate and describe a timeline too.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..base import PipelineError, require_text
from .prompts import ParsedPrompt, parse_prompt

TRANSITIONS = ("smooth", "cut")
DEFAULT_SMOOTH_WINDOW = 8


@dataclass(frozen=True)
class Shot:
    start: int
    prompt: str
    transition: str = "cut"  # how this shot begins; ignored for the first shot


@dataclass(frozen=True)
class Transition:
    """Frames ``first..last`` mix shot ``before`` into shot ``after``; ``first`` is purely ``before``."""

    before: int
    after: int
    first: int
    last: int


@dataclass(frozen=True)
class Timeline:
    shots: tuple[Shot, ...]
    smooth_window: int = DEFAULT_SMOOTH_WINDOW

    @property
    def is_multi_shot(self) -> bool:
        return len(self.shots) > 1

    def validate(self, num_frames: int) -> None:
        """Raise a PipelineError naming the first problem a user can fix."""
        if not self.shots:
            raise PipelineError("The shot list is empty. Add at least one shot with a prompt.")
        if self.shots[0].start != 0:
            raise PipelineError(f"The first shot must start at frame 0, not {self.shots[0].start}.")
        for number, shot in enumerate(self.shots, 1):
            if not shot.prompt.strip():
                raise PipelineError(f"Shot {number} has an empty prompt. Describe what happens in it.")
            if shot.transition not in TRANSITIONS:
                raise PipelineError(f"Shot {number}: transition must be one of {', '.join(TRANSITIONS)}, "
                                    f"got {shot.transition!r}.")
            if not 0 <= shot.start < num_frames:
                raise PipelineError(f"Shot {number} starts at frame {shot.start}, outside the video's frames "
                                    f"0..{num_frames - 1}. Lower its start or raise the frame count.")
        starts = [shot.start for shot in self.shots]
        if any(later <= earlier for earlier, later in zip(starts, starts[1:])):
            raise PipelineError(f"Shot start frames must increase strictly, got {starts}.")
        if self.smooth_window < 2:
            raise PipelineError(f"The smooth transition window must be at least 2 frames, got {self.smooth_window}.")

    def ranges(self, num_frames: int) -> list[tuple[int, int]]:
        """Each shot's frames as ``(first, last)``, inclusive."""
        ends = [shot.start - 1 for shot in self.shots[1:]] + [num_frames - 1]
        return [(shot.start, end) for shot, end in zip(self.shots, ends)]

    def transitions(self, num_frames: int) -> list[Transition]:
        """The mixing window of every boundary, clamped so neighbouring windows never overlap."""
        spans = [last - first + 1 for first, last in self.ranges(num_frames)]
        result = []
        for index in range(1, len(self.shots)):
            boundary = self.shots[index].start
            if self.shots[index].transition == "cut":
                before, after = 1, 0
            else:
                before = min(math.ceil(self.smooth_window / 2), spans[index - 1] // 2)
                after = min(self.smooth_window // 2, spans[index] // 2)
                before = max(before, 1)
            result.append(Transition(index - 1, index, boundary - before, boundary + after))
        return result

    def keyframes(self, num_frames: int) -> dict[int, str]:
        """FreeNoise's ``{frame: prompt}`` dict whose linear segments realise this timeline."""
        self.validate(num_frames)
        frames = {0: self.shots[0].prompt}
        for transition in self.transitions(num_frames):
            frames[transition.first] = self.shots[transition.before].prompt
            frames[transition.last] = self.shots[transition.after].prompt
        return dict(sorted(frames.items()))

    def frame_mix(self, num_frames: int) -> list[dict[int, float]]:
        """Per frame, the weight of each shot's embedding (weights sum to 1; at most two shots mix)."""
        self.validate(num_frames)
        shot_of = [index for index, (first, last) in enumerate(self.ranges(num_frames))
                   for _ in range(first, last + 1)]
        mix: list[dict[int, float]] = [{shot: 1.0} for shot in shot_of]
        for transition in self.transitions(num_frames):
            width = transition.last - transition.first
            for frame in range(transition.first, transition.last + 1):
                alpha = (frame - transition.first) / width
                mix[frame] = {transition.before: 1.0 - alpha, transition.after: alpha}
                mix[frame] = {shot: weight for shot, weight in mix[frame].items() if weight > 0.0}
        return mix

    def describe(self, num_frames: int) -> list[dict[str, Any]]:
        """One row per shot: its frame range and how it begins (for the UI and the sidecar)."""
        self.validate(num_frames)
        return [{"shot": number, "frames": f"{first}-{last}", "transition": "start" if number == 1 else shot.transition,
                 "prompt": shot.prompt}
                for number, (shot, (first, last)) in enumerate(zip(self.shots, self.ranges(num_frames)), 1)]


def parse_shots(value: str | list | None, smooth_window: int = DEFAULT_SMOOTH_WINDOW) -> Timeline:
    """A Timeline from JSON text or a list of ``{"start", "prompt", "transition"}`` objects (or rows)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return Timeline((), smooth_window)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise PipelineError(
                f"The shot list is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
                'Write it as [{"start": 0, "prompt": "...", "transition": "cut"}, ...].') from None
    if value is None:
        return Timeline((), smooth_window)
    if not isinstance(value, list):
        raise PipelineError('The shot list must be a JSON list like [{"start": 0, "prompt": "..."}].')
    shots = []
    for number, item in enumerate(value, 1):
        if isinstance(item, (list, tuple)):
            item = dict(zip(("start", "prompt", "transition"), item))
        if not isinstance(item, dict) or "start" not in item or "prompt" not in item:
            raise PipelineError(f'Shot {number} needs a "start" frame and a "prompt", got {item!r}.')
        try:
            start = int(item["start"])
        except (TypeError, ValueError):
            raise PipelineError(f"Shot {number}: start must be a whole frame number, got {item['start']!r}.") from None
        transition = str(item.get("transition") or "cut").strip().lower()
        shots.append(Shot(start, str(item["prompt"] or ""), transition))
    return Timeline(tuple(shots), smooth_window)


def request_timeline(shots: str | list | None, prompt: str, smooth_window: int, num_frames: int,
                     style: str = "") -> tuple[Timeline, tuple[ParsedPrompt, ...]]:
    """A video request's validated timeline (its shot list, else one shot of ``prompt``) and each shot's prompt
    as the token controls read it.

    Controls read [group] markers and the style phrase; the model always sees the cleaned text (as in the image
    tab), so a controls-off A/B renders the same words. Plain prompts pass through unchanged."""
    timeline = parse_shots(shots, smooth_window)
    if not timeline.shots:
        timeline = Timeline((Shot(0, require_text(prompt)),), smooth_window)
    timeline.validate(num_frames)
    parsed = tuple(parse_prompt(shot.prompt, style) for shot in timeline.shots)
    cleaned = tuple(replace(shot, prompt=item.text) for shot, item in zip(timeline.shots, parsed))
    return Timeline(cleaned, smooth_window), parsed


def add_shot(value: str, num_frames: int, transition: str = "cut") -> str:
    """The shot list with one more shot, starting halfway through the last one's frames (for the editor)."""
    timeline = parse_shots(value)
    shots = [asdict(shot) for shot in timeline.shots]
    if not shots:
        shots.append(asdict(Shot(0, "", "cut")))
    else:
        last = shots[-1]["start"]
        shots.append(asdict(Shot(min(num_frames - 1, last + max(1, (num_frames - last) // 2)), "", transition)))
    return json.dumps(shots, indent=1)


def remove_last_shot(value: str) -> str:
    return json.dumps([asdict(shot) for shot in parse_shots(value).shots[:-1]], indent=1)
