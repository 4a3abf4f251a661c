"""The event plumbing: one worker thread per request, a nested stage's events and result passed through in order,
cancel on close, and generator results kept by ``Returning``."""
from __future__ import annotations

import threading

from pipelines.base import CancelToken, Partial, Progress
from pipelines.streaming import Returning, stream_in_thread


def stage(cancel: CancelToken, threads: set[int], steps: int = 3):
    """A pipeline stage that streams a blocking call from a worker, as the image, video and song tabs do."""

    def blocking_call(emit):
        threads.add(threading.get_ident())
        for step in range(steps):
            cancel.raise_if_cancelled()
            emit(Progress(step + 1, steps, "inner"))
        return "made"

    yield Partial("before")
    made = yield from stream_in_thread(blocking_call, cancel)
    yield Partial(made)


def test_a_nested_stage_runs_on_the_request_worker_with_its_events_in_order():
    cancel, threads = CancelToken(), set()

    def request(emit):
        threads.add(threading.get_ident())
        for event in stage(cancel, threads):
            emit(event)
        return "done"

    outer = Returning(stream_in_thread(request, cancel))
    events = list(outer)
    assert [getattr(e, "value", getattr(e, "step", None)) for e in events] == ["before", 1, 2, 3, "made"]
    assert outer.value == "done"
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_stage_run_from_a_script_gets_a_worker_of_its_own():
    cancel, threads = CancelToken(), set()
    events = list(stage(cancel, threads))
    assert events[-1].value == "made" and len(threads) == 1 and threading.get_ident() not in threads


def test_closing_the_request_stream_cancels_its_nested_stage():
    cancel, threads = CancelToken(), set()
    started = threading.Event()

    def request(emit):
        for event in stage(cancel, threads, steps=10**6):
            started.set()
            emit(event)

    events = stream_in_thread(request, cancel)
    next(events)
    started.wait(5)
    events.close()
    assert cancel.cancelled


def test_returning_keeps_what_a_generator_returns():
    def count():
        yield 1
        yield 2
        return "two items"

    stream = Returning(count())
    assert stream.value is None and list(stream) == [1, 2] and stream.value == "two items"
