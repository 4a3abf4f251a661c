"""Requests, events and the Pipeline base class shared by every tab.

A pipeline turns a request dataclass into an iterator of events:
``Progress`` while it works, ``Partial`` for streamed values (text so far, an audio chunk, a preview
frame) and exactly one ``Result`` at the end. The UI (``components/``) and scripts consume the same
iterator, so everything a user sees is also available from Python and through the API.

What each tab streams and returns:

====== ============================================ ==================================================
tab    ``Partial.value``                            ``Result.value``
====== ============================================ ==================================================
text   ``str``: the text so far                     ``str``: the text
image  ``list[PIL.Image]``: preview frames          ``list[str]``: PNG paths (parameters in a text chunk)
video  (none: Progress per denoising step)          ``outputs.VideoOutput``: MP4 path, frames, frame strip
speech ``audio.pcm.AudioChunk``                     ``str``: WAV path (sidecar JSON next to it)
song   ``audio.pcm.AudioChunk`` (of the mix)        ``dict[str, str]``: WAV path per stem (``mix`` always)
====== ============================================ ==================================================

A same-seed A/B is asked for with a request's ``compare`` (a tab's ``COMPARISONS``; ``"none"`` = off) and run
inside the pipeline: the A side first (its Partials have ``side="A"``), then the request as set, whose Result
carries the A side's Result as ``baseline`` and the comparison in its stats (``with_baseline``).
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Generator, Iterable, Iterator

MAX_SEED = 2**32 - 1
# Bounds text before any tokenizer sees it: a 30 MB prompt once took 220 s and 4 GB to reject (issue 25).
MAX_TEXT_CHARS = 20_000


class PipelineError(Exception):
    """An error the user caused or can fix; its message is shown to them as is."""


class Cancelled(Exception):
    """Raised inside a pipeline when its request's cancel token was set."""


class CancelToken:
    """A flag that Stop sets and that pipelines check once per step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("Stopped by the user.")


@dataclass
class Progress:
    step: int
    total: int
    note: str = ""


@dataclass
class Partial:
    value: Any
    side: str = ""  # "A" while a same-seed A/B renders its A side, "" otherwise


@dataclass
class Result:
    value: Any
    stats: dict[str, float | int | str | bool] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    baseline: Result | None = None  # the A side of a same-seed A/B (the request with ``compare`` switched back)


NO_COMPARISON = "none"


def with_baseline(result: Result, baseline: Result, compare: str) -> Result:
    """B's Result of a same-seed A/B: A's Result attached, and what was compared and the time ratio in B's stats."""
    ratio = result.stats["time_s"] / max(float(baseline.stats["time_s"]), 1e-9)  # type: ignore[arg-type]
    result.stats.update(compare=compare, baseline_time_s=baseline.stats["time_s"],
                        time_ratio_vs_baseline=round(ratio, 4))
    result.baseline = baseline
    return result


def same_seed_ab(render_a: Callable[[], Generator[Event, None, Result]] | None,
                 render_b: Callable[[], Generator[Event, None, Result]],
                 compare: str) -> Generator[Event, None, Result]:
    """A same-seed A/B inside one request: the A side first (when there is one), then B with A attached."""
    baseline = (yield from render_a()) if render_a is not None else None
    result = yield from render_b()
    return result if baseline is None else with_baseline(result, baseline, compare)


def side_of_ab(events: Iterator[Event], side: str = "A") -> Generator[Event, None, Result]:
    """Pass on one side's Progress and Partials (Partials tagged ``side``) and return its Result."""
    result = None
    for event in events:
        if isinstance(event, Result):
            result = event
        else:
            yield replace(event, side=side) if isinstance(event, Partial) else event
    if result is None:
        raise RuntimeError("an A/B side ended without a Result")
    return result


Event = Progress | Partial | Result


@dataclass
class Request:
    """Fields every request has. ``seed=-1`` means "pick one"; the chosen seed is reported back."""

    seed: int = -1
    cancel: CancelToken = field(default_factory=CancelToken, repr=False, compare=False)

    def parameters(self) -> dict[str, Any]:
        """Every field that reproduces this result (what its saved file or sidecar JSON records)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cancel"}


def resolve_seed(seed: int | float | None) -> int:
    """Turn the user's seed into a concrete one; -1 (or None) draws a random seed."""
    if seed is None or int(seed) < 0:
        return random.randint(0, MAX_SEED)
    if int(seed) > MAX_SEED:
        raise PipelineError(f"Seed must be between -1 and {MAX_SEED}, got {int(seed)}.")
    return int(seed)


def require_text(value: str | None, what: str = "Prompt") -> str:
    """Reject empty or whitespace-only text, and text over MAX_TEXT_CHARS (checked before tokenizing, so the
    refusal costs nothing), with a message the user can act on."""
    text = "" if value is None else str(value)
    if not text.strip():
        raise PipelineError(f"{what} is empty. Type something to generate from.")
    if len(text) > MAX_TEXT_CHARS:
        raise PipelineError(f"{what} is {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}. Shorten it.")
    return text


def require_choice(value: str, what: str, choices: Iterable[str]) -> None:
    """Reject a value outside a tab's fixed choices (comparisons, schedulers), naming them."""
    choices = tuple(choices)
    if value not in choices:
        raise PipelineError(f"Unknown {what} {value!r}. Choose one of: {', '.join(choices)}.")


def require_range(value: float | int | None, name: str, low: float, high: float) -> float:
    """Reject NaN, missing and out-of-range numbers with a clear message."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PipelineError(f"{name} must be a number between {low} and {high}, got {value!r}.") from None
    if number != number or not (low <= number <= high):
        raise PipelineError(f"{name} must be between {low} and {high}, got {value!r}.")
    return number


class Pipeline:
    """Base for every tab's pipeline: a plain object with named components and one ``generate``."""

    task: str = ""
    request_type: type[Request] = Request

    def generate(self, request: Request) -> Iterator[Event]:
        raise NotImplementedError

    def run(self, request: Request) -> Result:
        """Run to completion and return the final Result (convenient from scripts and tests)."""
        result = None
        for event in self.generate(request):
            if isinstance(event, Result):
                result = event
        if result is None:
            raise RuntimeError(f"{type(self).__name__}.generate ended without a Result")
        return result
