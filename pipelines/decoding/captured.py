"""Small fixed-shape device functions replayed as CUDA graphs: a drafter's per-step tensor work (the ReDrafter
head's levels) is dozens of tiny kernels, each launch costing more host time than its GPU time. Captured once
per shape key, a step is one replay; off CUDA (or under ZeroGPU) the same function runs eagerly."""
from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

from .. import settings

log = logging.getLogger(__name__)


def capture_supported(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device the process owns; ZeroGPU attaches the GPU per call, so it stays eager."""
    return device.type == "cuda" and not settings.zero_gpu()


class CapturedCalls:
    """``call(key, fn, *inputs)`` runs ``fn(*inputs)``; with ``capture`` the first call per ``key`` captures
    ``fn`` on copies of the inputs, later calls copy the new inputs in and replay. ``fn`` must have fixed shapes
    for its key and return a tensor (or tuple of tensors); the outputs are the graph's own buffers, valid until
    the next call with that key. A failed capture turns capture off (eager from then on): that call runs
    ``eager`` (``fn`` when None; pass the uncompiled function where ``fn`` is a compiled one)."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], object]] = {}
        self._pool = None

    def call(self, key: Hashable, fn: Callable, *inputs: torch.Tensor, eager: Callable | None = None):
        if not self.capture:
            return fn(*inputs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(fn, inputs)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
                log.warning("CUDA graph capture of a drafter step failed (%s); drafting eagerly.", error)
                self.capture = False
                return (eager or fn)(*inputs)
        graph, static_inputs, outputs = self.graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return outputs

    def _record(self, fn: Callable, inputs: tuple[torch.Tensor, ...]):
        static_inputs = tuple(value.clone() for value in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: lazy initialisation, library handles
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(*static_inputs)
        return graph, static_inputs, outputs


class CapturedSteps:
    """For forwards whose steps replay through ``self._calls``: whether capture is on, and the graphs by key."""

    _calls: CapturedCalls

    @property
    def capture(self) -> bool:
        return self._calls.capture

    @property
    def graphs(self) -> dict:
        return self._calls.graphs
