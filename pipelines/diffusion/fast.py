"""Fast denoising: the UNet call of a diffusers loop replayed as a captured CUDA graph, controls and merging kept.

Why: below 2048 px a UNet call on an H200 waits on Python and kernel launches (SD1.5 512 px, batch 2: 32-46 ms
eager, 11.9 ms replayed as a graph). Replaying removes that, so users get the GPU-bound time.

How, at one hook: while a ``FastUNet`` is entered it replaces the UNet's ``forward`` on the instance, so the
stock diffusers loop (scheduler, callbacks, previews, Stop) runs unchanged. Each call:

1. its tensors are copied into static buffers of a cache entry keyed by everything the captured work depends on:
   shapes, dtypes and non-tensor arguments, the control structure, the merging config, the processors and hooks;
2. the token controls' per-step choice (is this ``KeyBias`` on at this step and timestep?) is made on the host,
   from the scheduler's timesteps read once per run, exactly as ``KeyBias.active`` decides it eagerly, and written
   into a static gate tensor; the controlled processors build their bias from gates and static masks, and add
   shared keys by static counts (``StaticBiases``), so the captured region has no Python branch on data;
3. the first call of a key runs once eagerly (warm-up: lazy inits, merging's index tables) and is then captured
   (``torch.cuda.CUDAGraph``, one memory pool per UNet); every call replays. The output is cloned, because the
   next replay overwrites it.

The UNet's forward pre-hooks (merging reads the timestep, the control reads the latent size, video shot controls
rewrite the context) are taken off the module while entered and run inside the captured region, on the static
inputs, so what they compute is part of the graph.

What runs eagerly instead: UNet calls with gradients and calls while ``suspended()`` (the step callback's own
UNet calls), and steps where an attention recorder is on (heatmaps accumulate Python-side). Work that takes
gradients through the UNet can still be captured whole with ``captured(name, fn, inputs)``: ToMe binding's
refinement passes (forward and backward, loss and gradients inside one graph) run that way in the image tab.

Which UNet pre-hooks may run inside a graph shared across requests is declared where each hook is defined
(``@hooks.capture_safe(name)``, registry ``hooks.CAPTURE_SAFE``; the name is the hook's part of the cache key).
Graphs are kept in the UNet's ``state.UNetState`` (``unet_graphs``), with what merging installed; the control and
the merging are read through their public accessors.

Backends: ``graph`` (default on CUDA), ``eager`` (the same static code path without capture: CPU, ZeroGPU, where
CUDA graphs are not used), ``off`` (not installed: the stock call).
"""
from __future__ import annotations

import copy
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .. import settings
from .attention import AppliedBias, AttentionControl, layer_matches
from .hooks import capture_name, put_pre_hooks, take_pre_hooks
from .state import UNetGraphs, UNetState, unet_state

BACKENDS = ("off", "eager", "graph")
# Graphs kept per UNet (resolution x batch x control structure); least recently used goes first. Sized for a user
# switching between the tab's control configurations at a few sizes, with binding's refinement graphs: with 8, the
# served benchmark's nine configurations (10 graphs, 5 of them binding's) evicted binding's graphs, which it then
# recaptured on every call (H100: capture_s 0.57 s of a 1.57 s request at 512 px, 0.81 s at 1024 px;
# image_served_h100_26f4781.json), and by the same rotation merge, lpa, compass and lpa+compass+merge recaptured
# their one graph in every timed call while plain never did (leakfix uses plain's graph and kept it recent).
# The graphs share one memory pool, so an entry costs its static inputs and output, not a pool of its own.
MAX_CACHED = 32


def unet_graphs(unet: torch.nn.Module) -> UNetGraphs:
    """The captured calls kept for ``unet`` across requests (in its ``state.UNetState``)."""
    return unet_state(unet).graphs


def supported(unet: Any) -> bool:
    """UNets whose forward is known to capture: diffusers' SD/SDXL UNet and AnimateDiff's motion UNet, without
    accelerate offload hooks (those move weights between devices inside the call) or PEFT adapters (switching
    them on and off per request is host-side state a captured graph would not see)."""
    from diffusers import UNet2DConditionModel, UNetMotionModel

    return (isinstance(unet, (UNet2DConditionModel, UNetMotionModel)) and getattr(unet, "_hf_hook", None) is None
            and not getattr(unet, "peft_config", None))


def choose_backend(device: torch.device | str, fast: bool, unet: Any) -> str:
    """The backend for a run: ``off`` when not asked or the model is unsupported; ``eager`` (no capture) on the
    CPU and on ZeroGPU (no CUDA graphs there); else ``TOKENWORKS_FAST_BACKEND`` or ``graph``."""
    if not fast or not supported(unet):
        return "off"
    if torch.device(device).type != "cuda" or settings.zero_gpu():
        return "eager"
    backend = settings.fast_backend()
    return backend if backend in BACKENDS else "graph"


# ---- static controls ---------------------------------------------------------------------------------------
@dataclass
class LayerMasks:
    """One controlled layer's biases as static tensors: bias ``i`` adds ``values[i]`` where its gate, its row,
    its query and its key are all on."""

    index: torch.Tensor  # [n] which gates
    rows: torch.Tensor  # [n, batch] bool
    queries: torch.Tensor  # [n, Q] bool
    keys: torch.Tensor  # [n, K] bool
    values: torch.Tensor  # [n]
    applied: list[tuple[str, tuple[int, ...], int]]  # per bias: label, key columns, query count (host side)


class StaticBiases:
    """An ``AttentionControl``'s key biases in capturable form; ``ControlledAttnProcessor`` asks it for the bias.

    ``buffers`` belong to the cache entry in use, so a graph captured in one request replays in the next with
    that request's masks copied into the same tensors."""

    def __init__(self, control: AttentionControl) -> None:
        self.control = control
        self.biases = list(control.biases)
        self.layers: dict[str, list[int]] = {}
        for name in control.layers:
            chosen = [i for i, b in enumerate(self.biases) if b.tokens and layer_matches(b.layers, name)]
            if chosen:
                self.layers[name] = chosen
        self.anchor = {i: name for name, chosen in reversed(self.layers.items()) for i in chosen}
        self.buffers: dict[Any, Any] = {}
        self.shapes: dict[str, tuple] = {}  # layer -> its masks' key in ``buffers``, in call order
        self._patterns: dict[tuple[bool, ...], torch.Tensor] = {}
        self.gates: tuple[bool, ...] = ()

    def structure(self) -> tuple:
        shares = tuple((s.target, s.source, str(s.rows)) for s in self.control.key_shares)  # captured as indices
        return tuple((name, len(chosen)) for name, chosen in self.layers.items()) + shares

    def covers(self, name: str) -> bool:
        return name in self.layers

    def decide(self, step: int, timestep: float | None) -> tuple[bool, ...]:
        """Each bias on or off at this call, by the eager predicate itself."""
        return tuple(i in self.anchor and b.active(self.anchor[i], step, timestep) for i, b in enumerate(self.biases))

    def set_gates(self, gates: tuple[bool, ...], device: torch.device) -> None:
        """Write the gates into the static gate tensor (a device-to-device copy: no host sync per step)."""
        self.gates = gates
        if not self.layers:
            return
        pattern = self._patterns.get(gates)
        if pattern is None:
            pattern = torch.zeros(len(gates), dtype=torch.bool, device=device)
            for i, on in enumerate(gates):
                if on:
                    pattern[i] = True
            self._patterns[gates] = pattern
        target = self.buffers.get("gates")
        if target is None or target.device != pattern.device:
            self.buffers["gates"] = target = torch.zeros_like(pattern)
        target.copy_(pattern)

    def bias(self, name: str, batch: int, queries: int, keys: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor | None:
        """``[batch, 1, Q, K]`` additive bias from the static gates and masks (same values as ``build_bias``)."""
        if name not in self.layers:
            return None
        key = (name, batch, queries, keys, dtype)
        masks = self.buffers.get(key)
        if masks is None:
            masks = self.buffers[key] = self.masks(name, batch, queries, keys, device, dtype)
        self.shapes.setdefault(name, key)
        on = self.buffers["gates"].index_select(0, masks.index)[:, None] & masks.rows
        cells = on[:, :, None, None] & masks.queries[:, None, :, None] & masks.keys[:, None, None, :]
        return torch.where(cells, masks.values[:, None, None, None], 0).sum(0)[:, None]

    def share_counts(self, name: str, batch: int, keys: int, device: torch.device,
                     dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """The control's key-share counts of this layer, built once per cache entry instead of in every call (a
        zero fill and two small kernels per share and layer that each replay would repeat). They follow from the
        shares' targets, sources and rows and from the shapes, all part of the entry's key, so unlike the masks
        they need no refill for a later request."""
        key = ("shares", name, batch, keys, dtype)
        counts = self.buffers.get(key)
        if counts is None:
            counts = self.buffers[key] = self.control.share_counts(name, batch, keys, device, dtype)
        return counts

    def masks(self, name: str, batch: int, queries: int, keys: int, device: torch.device,
              dtype: torch.dtype) -> LayerMasks:
        """Masks of this layer's biases for this request (host work, once per entry and request)."""
        control, chosen = self.control, self.layers[name]
        rows = torch.zeros(len(chosen), batch, dtype=torch.bool)
        query_mask = torch.ones(len(chosen), queries, dtype=torch.bool)
        key_mask = torch.zeros(len(chosen), keys, dtype=torch.bool)
        applied = []
        for row, i in enumerate(chosen):
            item = self.biases[i]
            rows[row, control.row_slice(item.rows, batch)] = True
            if item.region is not None:
                query_mask[row] = control.region_mask(item.region.cpu(), queries)
            tokens = tuple(t for t in item.tokens if t < keys)
            key_mask[row, list(tokens)] = True
            applied.append((item.label, tokens, int(query_mask[row].sum())))
        values = torch.tensor([self.biases[i].value for i in chosen], dtype=dtype)
        return LayerMasks(torch.tensor(chosen, device=device), rows.to(device), query_mask.to(device),
                          key_mask.to(device), values.to(device), applied)

    def adopt(self, buffers: dict, device: torch.device) -> None:
        """Refill a cache entry's mask tensors with this request's masks (a graph reads them by address)."""
        for key, old in list(buffers.items()):
            if isinstance(old, LayerMasks):
                name, batch, queries, keys, dtype = key
                new = self.masks(name, batch, queries, keys, device, dtype)
                for attr in ("index", "rows", "queries", "keys", "values"):
                    getattr(old, attr).copy_(getattr(new, attr))
                old.applied = new.applied

    def record_applied(self, step: int, timestep: float | None) -> None:
        """What ``build_bias`` would have appended for this call (a replay runs no Python)."""
        for name, key in self.shapes.items():
            masks = self.buffers.get(key)
            if masks is None:
                continue
            for i, (label, tokens, count) in zip(self.layers[name], masks.applied):
                if self.gates[i] and tokens:
                    self.control.applied.append(AppliedBias(step, timestep, name, label, tokens, count))


# ---- the captured call -------------------------------------------------------------------------------------
def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of ``value`` with its tensors pulled out into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, dict):
        return ("D", tuple((k, _flatten(v, tensors)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return ("L" if isinstance(value, list) else "U", tuple(_flatten(v, tensors) for v in value))
    return ("V", value if value is None or isinstance(value, (bool, int, float, str)) else repr(value))


def _rebuild(spec: Any, tensors: Iterator[torch.Tensor]) -> Any:
    kind, body = spec[0], spec[1]
    if kind == "T":
        return next(tensors)
    if kind == "D":
        return {k: _rebuild(v, tensors) for k, v in body}
    if kind in ("L", "U"):
        items = [_rebuild(v, tensors) for v in body]
        return items if kind == "L" else tuple(items)
    return body


def _clone(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone(v) for v in output)
    if isinstance(output, dict):  # diffusers' BaseOutput dataclasses
        return type(output)(**{k: _clone(v) for k, v in output.items()})
    return output


@dataclass
class Entry:
    """Static inputs, the captured graph and the control buffers of one cache key."""

    spec: Any
    inputs: list[torch.Tensor]
    params: list[weakref.ref]
    buffers: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    graph: Any = None
    output: Any = None
    merged: tuple[int, int] = (0, 0)  # tokens and blocks merged per call (counted at capture)
    owner: Any = None  # weak reference to the StaticBiases whose masks the buffers hold
    run_scoped: bool = False


class FastUNet:
    """Context manager: the UNet's calls take the fast path (see the module docstring) until exit.

    ``step`` is the denoising step of the next call; the pipeline's step callback advances it. ``timesteps``
    returns the scheduler's timesteps (read once per run, so the controls' timestep windows need no device sync).
    """

    def __init__(self, unet: torch.nn.Module, backend: str = "graph", control: AttentionControl | None = None,
                 timesteps: Callable[[], Any] | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown fast-path backend {backend!r}; choose one of {BACKENDS}.")
        self.unet, self.backend, self.control, self.timesteps = unet, backend, control, timesteps
        self.state: UNetState = unet_state(unet)  # its graphs and installed merging, shared across requests
        self.step = 0
        self.capture_s = 0.0
        self.replays = 0
        self.eager_calls = 0
        self.cache_misses = 0  # entries this run built: each one a capture on the graph backend
        self.capture_failures: set[str] = set()
        self._suspended = 0
        self._hooks: tuple[OrderedDict, dict] | None = None  # the UNet's pre-hooks, taken off while entered
        self._static: StaticBiases | None = None
        self._table: tuple[Any, list[float]] | None = None

    # ---- install -------------------------------------------------------------------------------------------
    def __enter__(self) -> "FastUNet":
        if self.backend == "off":
            return self
        unet = self.unet
        self._hooks = take_pre_hooks(unet)
        unet.forward = self.forward
        self._params = [p for p in unet.parameters()]
        self._checked: set[int] = set()
        if self.control is not None and not self.control.installed:  # installed nothing: stock processors
            self.control = None
        self._static = StaticBiases(self.control) if self.control is not None else None
        self._context = self._context_key()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend == "off" or self._hooks is None:
            return
        del self.unet.forward
        put_pre_hooks(self.unet, self._hooks)
        self._hooks = None
        cache = self.cache
        for key in [k for k, e in cache.items() if e.run_scoped]:
            del cache[key]
        if self.control is not None:
            self.control.static = None

    @property
    def cache(self) -> "OrderedDict[Any, Entry]":
        return self.state.graphs.entries

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """UNet calls in here run the stock eager call (for work inside the step callback: ToMe refinement)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _context_key(self) -> tuple:
        """What the captured work depends on besides the inputs."""
        hooks = tuple(capture_name(h) for h in self._hooks[0].values())
        merging = self.state.merging
        processors = tuple(sorted({type(p).__name__ for p in self.unet.attn_processors.values()}))
        # Hooks not registered as capture-safe may read per-request tensors by address: graphs for this run only.
        scoped = None if None not in hooks else id(self)
        return (hooks, merging.config if merging is not None and merging.active else None, processors,
                self._static.structure() if self._static is not None else (), self.backend, scoped)

    # ---- the call ------------------------------------------------------------------------------------------
    def _run_hooked(self, args: tuple, kwargs: dict) -> Any:
        """The UNet's pre-hooks then its class forward: exactly what ``module(*args, **kwargs)`` runs."""
        pre, with_kwargs = self._hooks
        for hook_id, hook in pre.items():
            if with_kwargs.get(hook_id):
                result = hook(self.unet, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(self.unet, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def host_timestep(self, timestep: Any) -> float | None:
        """The call's timestep as a host float: the scheduler's table at ``step`` (read once), else the value."""
        if self.timesteps is not None:
            source = self.timesteps()
            if source is not None:
                if self._table is None or self._table[0] is not source:
                    self._table = (source, [float(v) for v in torch.as_tensor(source).flatten().cpu()])
                table = self._table[1]
                if 0 <= self.step < len(table):
                    return table[self.step]
        if timestep is None:
            return None
        return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)

    def recording(self) -> bool:
        return self.control is not None and self.control.recording()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        control = self.control
        if self._suspended or torch.is_grad_enabled():
            self.eager_calls += 1
            return self._run_hooked(args, kwargs)
        tensors: list[torch.Tensor] = []
        spec = _flatten((args, kwargs), tensors)
        sample = tensors[0]
        if self.backend == "graph" and sample.device.type != "cuda":
            self.backend = "eager"
            self._context = self._context_key()
        key = (spec, self._context)
        entry = self._lookup(key)
        static = self._static
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if control is not None:
            control.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
            control.timestep = self.host_timestep(timestep) if static is not None and static.layers else None
        fresh = entry is None
        if fresh:
            self.cache_misses += 1
            entry = self._new_entry(spec, tensors)
        else:
            self.cache.move_to_end(key)
            for buffer, value in zip(entry.inputs, tensors):
                buffer.copy_(value)
        if static is not None:
            if (entry.owner is None or entry.owner() is not static) and entry.buffers:
                static.adopt(entry.buffers, sample.device)
            static.buffers, static.shapes = entry.buffers, entry.shapes
            entry.owner = weakref.ref(static)
            static.set_gates(static.decide(control.step, control.timestep), sample.device)
        call_args, call_kwargs = _rebuild(spec, iter(entry.inputs))
        if self.backend == "eager" or self.recording():
            output = self._eager(call_args, call_kwargs)
        elif fresh or entry.graph is None:
            output = self._capture(entry, lambda: self._run_hooked(call_args, call_kwargs))
            self._store(key, entry)
        else:
            output = self._replay(entry)
        if self.backend == "eager" and fresh:
            self._store(key, entry)
        if static is not None:
            static.record_applied(control.step, control.timestep)
        return output

    def captured(self, name: str, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor],
                 key: tuple = ()) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)``, work that may take gradients (ToMe's refinement), on the fast path: on CUDA with the
        ``graph`` backend captured once per ``name``, ``key`` and input shapes (forward and backward in one graph)
        and replayed; by the ``eager`` backend run directly on the same static code path. ``fn`` must read no
        tensor besides the UNet's weights that is not in ``inputs``, and return tensors. With key biases or key
        shares on the control (refinement scopes change them), and with the fast path off, it runs as plain eager
        code."""
        static = self._static
        plain = self._hooks is None or (static is not None and static.layers) or bool(
            self.control is not None and self.control.key_shares)
        self._suspended += 1  # the UNet calls inside belong to this work, not fast-path calls of their own
        try:
            if plain:
                return fn(*inputs)
            if self.backend != "graph" or inputs[0].device.type != "cuda":
                with self._static_mode():
                    return fn(*inputs)
            spec = (name, key, tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs))
            cache_key = (spec, self._context)
            entry = self._lookup(cache_key)
            failed = self.state.graphs.failed
            if entry is None and cache_key not in failed:
                self.cache_misses += 1
                entry = self._new_entry(spec, inputs)
                try:
                    output = self._capture(entry, lambda: fn(*entry.inputs))
                except RuntimeError as error:  # a capture that fails leaves the work to the eager static path
                    failed[cache_key] = f"{name}: {error}"
                else:
                    self._store(cache_key, entry)
                    return output
            if entry is None:
                self.capture_failures.add(failed[cache_key])
                with self._static_mode():
                    return fn(*inputs)
            self.cache.move_to_end(cache_key)
            for buffer, value in zip(entry.inputs, inputs):
                buffer.copy_(value)
            return self._replay(entry)
        finally:
            self._suspended -= 1

    def _lookup(self, key: Any) -> Entry | None:
        """The cached entry of ``key``, if it was captured with these very weights (not new ones at old addresses)."""
        entry = self.cache.get(key)
        if entry is not None and id(entry) not in self._checked:
            if all(ref() is p for ref, p in zip(entry.params, self._params)):
                self._checked.add(id(entry))
            else:
                del self.cache[key]
                entry = None
        return entry

    def _store(self, key: Any, entry: Entry) -> None:
        self.cache[key] = entry
        while len(self.cache) > MAX_CACHED:
            self.cache.popitem(last=False)

    def _new_entry(self, spec: Any, tensors: list[torch.Tensor]) -> Entry:
        inputs = [t.detach().clone() for t in tensors]
        return Entry(spec, inputs, [weakref.ref(p) for p in self._params], run_scoped=self._context[-1] is not None)

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        self.eager_calls += 1
        with self._static_mode():
            return _clone(self._run_hooked(args, kwargs))

    @contextmanager
    def _static_mode(self) -> Iterator[None]:
        if self.control is None:
            yield
            return
        with self.control.static_biases(self._static):
            yield

    def _capture(self, entry: Entry, run: Callable[[], Any]) -> Any:
        """Warm up ``run`` once eagerly on a side stream, capture it, replay; the time goes to
        ``capture_s``."""
        start = time.perf_counter()
        merging = self.state.merging
        counted = copy.copy(merging.stats) if merging is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with self._static_mode():
            with torch.cuda.stream(stream):
                run()
            torch.cuda.current_stream().wait_stream(stream)
            if merging is not None:
                entry.merged = merging.stats.last_call()
            graphs = self.state.graphs
            if graphs.pool is None:
                graphs.pool = torch.cuda.graph_pool_handle()
            entry.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(entry.graph, pool=graphs.pool, capture_error_mode="thread_local"):
                entry.output = run()
        if merging is not None:
            merging.stats.restore(counted)
        output = self._replay(entry)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - start
        return output

    def _replay(self, entry: Entry) -> Any:
        self.replays += 1
        entry.graph.replay()
        output = _clone(entry.output)
        merging = self.state.merging
        if merging is not None and merging.active:
            merging.stats.add_call(entry.merged)
        return output

    def stats(self) -> dict[str, Any]:
        """For the stats panel: the backend, seconds spent capturing in this run (0 when every graph was cached),
        cache entries it had to build (``graph_cache_misses``: on the graph backend each is a capture, so a cache
        that evicts what the next request needs shows here on any device), graph replays and eager UNet calls."""
        failures = {"capture_failed": sorted(self.capture_failures)} if self.capture_failures else {}
        return {"fast": self.backend, "capture_s": round(self.capture_s, 3), "graph_cache_misses": self.cache_misses,
                "graph_replays": self.replays, "eager_unet_calls": self.eager_calls, **failures}
