"""Stop frees the GPU lane on every tab: a cancelled job ends within a step and the next job runs at once.

Two ways a running job is stopped: the Stop button (it sets the session's cancel token) and Gradio's own
cancel (``job.cancel()`` from the API, or the browser leaving), which closes the event's generator.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from pipelines.base import Progress, Result
from quality_support import (
    client_for, hook_model_forwards, registered_tasks, run_job, shared_app, stats_of, submit,
    tab_case,
)

TASKS = registered_tasks()
STOP_DEADLINE_S = 2.0  # far above one tiny step; far below a whole long job
NEXT_JOB_DEADLINE_S = 60.0


@dataclass
class Watch:
    """What the pipeline and its models did, with monotonic timestamps."""

    events: list[tuple[float, object]] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)
    forwards: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def forwards_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for t in self.forwards if t > moment)


@contextmanager
def watched(app, task: str, delay_s: float):
    """Record ``task``'s pipeline events and every model forward, slowing forwards by ``delay_s``."""
    pipeline, watch = app.registry[task], Watch()
    original = pipeline.generate

    def generate(request):
        try:
            for event in original(request):
                watch.events.append((time.monotonic(), event))
                yield event
        finally:
            watch.ended.append(time.monotonic())

    def before_forward():
        with watch.lock:
            watch.forwards.append(time.monotonic())
        if delay_s:
            time.sleep(delay_s)

    pipeline.generate = generate
    unhook = hook_model_forwards(before_forward)
    try:
        yield watch
    finally:
        unhook()
        del pipeline.generate


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def app():
    return shared_app()


def stop_cases():
    for task in TASKS:
        yield pytest.param(task, "stop-button", id=f"{task}-stop-button")
        yield pytest.param(task, "api-cancel", id=f"{task}-api-cancel")


@pytest.mark.parametrize("task,how", list(stop_cases()))
def test_stop_ends_the_job_within_a_step_and_the_next_job_starts(app, task, how):
    from components.common import CANCELS

    client = client_for(app.url)
    api = client.view_api(print_info=False, return_format="dict")
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    run_job(submit(client, api, task, case.valid))  # loads the tab's models

    with watched(app, task, case.forward_delay_s) as watch:
        job = submit(client, api, task, case.long)
        wait_for(lambda: len(watch.forwards) >= 3, 120, "the long job to start its model forwards")
        stopped_at = time.monotonic()
        if how == "stop-button":
            CANCELS.stop(client.session_hash)
        else:
            job.cancel()
        try:
            wait_for(lambda: watch.ended, STOP_DEADLINE_S + 3, "the cancelled pipeline to end")
        finally:  # a job that ignored the cancel is still running: stop it for the next tests
            CANCELS.stop(client.session_hash)
            wait_for(lambda: watch.ended, 60, "the Stop button to end a job that ignored the cancel")
        ended_at = watch.ended[0]
        time.sleep(0.3)
        late_forwards = watch.forwards_after(ended_at)

    steps = [event.step for _, event in watch.events if isinstance(event, Progress)]
    assert not any(isinstance(event, Result) for _, event in watch.events), "the job ran to the end: not stopped"
    assert ended_at - stopped_at <= STOP_DEADLINE_S, (
        f"{task} kept generating {ended_at - stopped_at:.2f} s after Stop "
        f"({watch.forwards_after(stopped_at)} model forwards; progress reached step {max(steps, default=0)})")
    assert late_forwards == 0, f"{late_forwards} model forwards ran after the job ended: the GPU lane is not free"

    started = time.monotonic()
    outputs = run_job(submit(client, api, task, case.valid), timeout=NEXT_JOB_DEADLINE_S)
    assert stats_of(outputs), "the job after Stop failed"
    assert time.monotonic() - started < NEXT_JOB_DEADLINE_S


def test_stop_reports_the_token_it_stopped_at_and_keeps_the_partial_output(app):
    """What the Stop button shows: where the run stopped, from the run itself; the partial text stays and no
    Result pretends the run finished."""
    from components.common import CANCELS, run_pipeline
    from pipelines.base import Partial
    from pipelines.tabs.text import TextRequest

    request = TextRequest(**{"prompt": "1 2 3 4 5", "max_new_tokens": 480, "seed": 1, "method": "vanilla"})
    seen, stopped = [], None
    unhook = hook_model_forwards(lambda: time.sleep(0.01))
    try:
        for event in run_pipeline(app.registry["text"], request, None):
            seen.append(event)
            if stopped is None and isinstance(event, Progress) and event.step >= 5:
                stopped = CANCELS.stop(None, "text")
    finally:
        unhook()
    assert stopped is not None and stopped.step >= 5, "Stop found the running request and how far it got"
    report = stopped.stopped_stats()
    assert report["stopped"] is True and report["stopped_at"] == f"token {stopped.step} of 480"
    assert f"Stopped at token {stopped.step} of 480" in stopped.stopped_message()
    assert not any(isinstance(event, Result) for event in seen), "a stopped run reports no finished result"
    partial = [event.value for event in seen if isinstance(event, Partial)]
    assert partial and partial[-1], "the partial output is kept"
    assert CANCELS.stop(None, "text") is None, "a run that has ended is not reported as stopped again"


def test_a_run_closed_with_its_result_in_flight_is_reported_by_stop(app):
    """Gradio's cancel can close the handler after the pipeline's Result but before the browser got it: that run
    has not finished for the user, so Stop reports where it stopped instead of leaving the panels empty."""
    from components.common import CANCELS, run_pipeline
    from pipelines.tabs.text import TextRequest

    request = TextRequest(**{"prompt": "1 2 3", "max_new_tokens": 4, "seed": 1, "method": "vanilla"})
    events = run_pipeline(app.registry["text"], request, None)
    assert any(isinstance(event, Result) for event in events)  # stops at the Result, as a cancel would
    events.close()
    assert CANCELS.stop(None, "text") is not None
    events = run_pipeline(app.registry["text"], request, None)
    results = [event for event in events if isinstance(event, Result)]
    assert CANCELS.stop(None, "text") is None, "a run whose every event was taken has finished"
    assert CANCELS.ended(None, "text").result_stats is results[0].stats, "kept for a Stop that lands as it ends"


def test_the_stop_button_writes_its_report_into_the_tab_panels():
    """The Stop button's own handler: one stats dict for a tab with a stats panel, stats and a message for the
    text tab; "before it started" while the clicked request has not left the queue (the first one, or one queued
    after a run that ended); nothing (skipped) once the session's run on that tab has ended, but the finished run's
    stats again (Gradio's cancel can drop the result's last message)."""
    from types import SimpleNamespace

    import gradio as gr

    from components.common import CANCELS, wire_stop

    with gr.Blocks() as demo:
        stop, stats, message = gr.Button(), gr.JSON(), gr.Markdown()
        wire_stop(stop, "image", [], stats)
        wire_stop(stop, "text", [], stats, message)
    image_stop, text_stop = [fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "stop_and_report"]
    session = SimpleNamespace(session_hash="stop-report-test")
    assert all(value.get("__type__") for value in text_stop(session)), "nothing asked for: nothing to report"
    CANCELS.ask(session.session_hash, "text")
    CANCELS.ask(session.session_hash, "image")
    report, shown = text_stop(session)  # asked for, not started yet: still queued
    assert report["stopped_at"] == "before it started" and "Stopped before it started" in shown
    assert image_stop(session)["stopped_at"] == "before it started"
    run = CANCELS.start(session.session_hash, "image")
    run.step, run.total = 3, 30
    report = image_stop(session)
    assert run.token.cancelled and report["stopped_at"] == "step 3 of 30" and report["steps_done"] == 3
    assert "stage" not in report
    run = CANCELS.start(session.session_hash, "image")
    run.total, run.stage = 30, "loading model"
    assert image_stop(session)["stage"] == "loading model", "a stop before the first step says what it stopped"
    run = CANCELS.start(session.session_hash, "text")
    run.step, run.total, run.started = 7, 64, run.started - 2.0  # it ran 2 s
    report, shown = text_stop(session)
    assert report["stopped_at"] == "token 7 of 64" and "Stopped at token 7 of 64" in shown
    assert report["tokens_per_s"] == pytest.approx(7 / report["time_s"], rel=0.05)
    run.finished = True
    assert all(isinstance(value, dict) and value.get("__type__") for value in text_stop(session)), "skipped"
    run.result_stats = {"tokens_per_s": 50.0}  # a run that ended with its result, as Stop lands
    report, shown = text_stop(session)
    assert report == {"tokens_per_s": 50.0} and shown.get("__type__"), "the finished run's stats shown again"
    CANCELS.ask(session.session_hash, "text")  # a second click, queued after the run that ended
    assert text_stop(session)[0]["stopped_at"] == "before it started"
    running = CANCELS.start(session.session_hash, "text")
    CANCELS.ask(session.session_hash, "text")  # a click while a run goes on: Stop still reaches the running one
    assert text_stop(session)[0]["stopped_at"] == "token 0 of 0" and running.token.cancelled
