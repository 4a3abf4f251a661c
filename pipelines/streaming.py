"""One worker thread per request, its events streamed back to the caller (image, video, song and the UI).

diffusers' ``__call__`` and the song renderers are single blocking calls whose previews and chunks are produced
inside them; running each on a worker lets those stream out as they happen, and lets the consumer cancel. The UI
runs a whole request on a worker (``components.common.run_pipeline``); a pipeline's own ``stream_in_thread`` inside
it then runs right there on that worker, its events going straight to the request's consumer, so a request never
holds two threads."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generator, Generic, Iterator, TypeVar

import torch

from .base import Event, Progress

_DONE = object()
Item = TypeVar("Item")
Value = TypeVar("Value")


class Returning(Generic[Item, Value]):
    """Iterate a generator in a ``for`` loop and keep what it returns: stages that stream chunks (Bark, MusicGen)
    return their result rather than filling an out-parameter. ``value`` is set once the loop ends."""

    def __init__(self, generator: Generator[Item, Any, Value]) -> None:
        self.generator = generator
        self.value: Value | None = None

    def __iter__(self) -> Iterator[Item]:
        self.value = yield from self.generator


class WarmThreads:
    """Worker threads kept for reuse, one per concurrent job (never a fixed pool, so nested jobs cannot deadlock).

    Why not a new thread per request: cuDNN's execution-plan cache and cuBLAS handles are per thread in PyTorch,
    so every fresh thread re-plans each convolution on its first UNet call (~0.4 s per SD1.5 request on an H200,
    measured in benchmarks/results/image_served_breakdown_h200.json). The most recently idle thread is reused
    first, so a request's GPU work lands on the thread that ran the previous one. Only with CUDA: on the CPU a
    reused thread made order-dependent last-bit differences against the stock call (tests/test_image_controls.py,
    tests/test_video.py in the full suite), and there is no per-thread plan cache to keep."""

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        if not torch.cuda.is_available():  # CPU: a fresh thread per job, no thread-local state carried over
            threading.Thread(target=job, name="pipeline-worker", daemon=True).start()
            return
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="pipeline-worker", daemon=True).start()
        inbox.put(job)

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            inbox.get()()
            with self._lock:
                self._idle.append(inbox)


WORKERS = WarmThreads()
# On a worker: how the request it runs emits events to its consumer (None elsewhere).
_worker = threading.local()


def stream_in_thread(work: Callable[[Callable[[Event], None]], Any], cancel: Any,
                     latest_progress: bool = False) -> Iterator[Event]:
    """Run ``work(emit)`` on a worker thread and yield what it emits; return its result (``yield from``).

    diffusers' ``__call__`` is one blocking call, and previews are produced inside its step callback; the
    thread lets them stream out as they happen. Closing the iterator (the user left) cancels the work.
    ``latest_progress`` skips a Progress when a newer event already waits, so a slow consumer never lags.

    Called on a worker (a stage of a request that already streams from one), ``work`` runs in place and emits
    straight to that request's consumer: so code between the two must pass such events on unchanged."""
    emit_to_consumer = getattr(_worker, "emit", None)
    if emit_to_consumer is not None:
        return work(emit_to_consumer)
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        _worker.emit = events.put
        try:
            outcome["value"] = work(events.put)
        except BaseException as error:  # re-raised on the consumer's thread
            outcome["error"] = error
        finally:
            _worker.emit = None
            events.put(_DONE)
            done.set()

    WORKERS.submit(target)
    finished = False
    try:
        while (item := events.get()) is not _DONE:
            if not (latest_progress and isinstance(item, Progress) and not events.empty()):
                yield item
        finished = True
    finally:
        if not finished:
            cancel.cancel()
        done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
