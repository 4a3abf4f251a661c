"""GPU fast path for the verifier: a static KV cache, tree blocks padded to fixed query sizes, rollback by
moving the write position back, and one CUDA graph per padded size (reference §2.5, §9.3).

Stock transformers decoding is host-bound (~22–32 ms per forward on an H200 for 0.5B–8B): every step
re-launches ~1000 small kernels from Python. With fixed shapes the whole step (mask build, model forward,
LM head) is captured once per bucket and replayed with a single launch; the host only writes the step's
ids, positions, write offset and the block's ancestor pattern into pinned buffers.

Layout of one step padded to bucket ``B``: rows ``0..q-1`` are the real block (re-fed committed chain, then
the tree), rows ``q..B-1`` are dummy nodes that attend only to themselves; K/V of row ``j`` are written at
cache row ``past + j``. The mask has the cache's full width: the prefix ``[0, past)`` is visible to real
rows, the block follows its ancestor pattern, and every row at or beyond ``past + B`` is hidden, so stale
K/V left there by earlier steps (rejected nodes, dummies) are never read. Rolling back is therefore only
``length -= k`` on the host: nothing is copied or cropped. Sliding-window layers are full-length here too; their
mask is the same pattern AND the window at each row's logical position (``sliding.AttentionLayout.masks``).

``capture=False`` (CPU, ZeroGPU, or a failed capture) runs the very same padded static code eagerly.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from transformers.cache_utils import Cache, StaticLayer

from .captured import CapturedCalls, CapturedSteps, capture_supported
from .tree import TokenTree
from .verify import CausalLMForward

BUCKETS = (1, 8, 16, 32, 64, 128, 256)
COMPILE_MODES = ("off", "layers", "dynamic")


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's repeated decoder blocks (``model.model.layers`` in transformers' causal LMs), or None."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def compiled_parts(layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """The parts of each decoder layer that are pure tensor code: its norms and MLP, not its attention (which indexes
    the cache by its layer number: dynamo would compile it once per layer, past its recompile limit of 8), and no
    module carrying hooks (a compiled call bypasses them)."""
    return [part for layer in layers for part in layer.children()
            if "Attention" not in type(part).__name__ and not (part._forward_hooks or part._forward_pre_hooks)]


class LayerCompile:
    """Inductor on the decoder layers' norms and MLPs (regional compilation): every layer's parts run the same code,
    so dynamo compiles each kind once (symbolic block sizes) and every layer shares it. Compiling then takes
    seconds instead of the unrolled model's minutes (``dynamic`` whole-step compile: 206 s on an H100 for
    SmolLM2-135M), and the CUDA graph replays the fused norm and MLP kernels. The compiled calls are installed on
    the shared model only while the static step runs, so its other callers (transformers ``generate``, exact
    mode, another tab) keep their eager modules."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.parts = compiled_parts(layers)
        # ``Module.compile`` keeps its compiled call in this attribute; here it is set per step instead
        self.calls = [torch.compile(part.forward, dynamic=True) for part in self.parts]

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = [part._compiled_call_impl for part in self.parts]
        for part, call in zip(self.parts, self.calls):
            part._compiled_call_impl = call
        try:
            yield
        finally:
            for part, call in zip(self.parts, previous):
                part._compiled_call_impl = call

    def around(self, step: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., tuple]:
        """``step`` run with the compiled parts installed."""
        def compiled_step(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with self.installed():
                return step(*args)
        return compiled_step


class IndexedStaticLayer(StaticLayer):
    """A ``StaticLayer`` that writes K/V at the rows named by a shared index tensor instead of bumping its own
    counter: the write position is an input of the step, so rollback never touches device state. ``rows`` is the
    step's view of that index: its first q entries are where the block's K/V go, and its length is the step's
    key width (the cache rows attention reads: the first ``width`` of the cache, see ``StaticForward.widths``)."""

    def __init__(self, max_cache_len: int, rows: torch.Tensor) -> None:
        super().__init__(max_cache_len)
        self.rows = rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows = self.rows[: key_states.shape[-2]]
        self.keys.index_copy_(2, rows, key_states)
        self.values.index_copy_(2, rows, value_states)
        width = self.rows.shape[0]
        return self.keys[:, :, :width], self.values[:, :, :width]


def key_widths(max_cache_len: int, top_bucket: int) -> tuple[int, ...]:
    """The key widths a step may attend over: powers of two from the largest bucket up, then the whole cache.
    Attention over unused cache rows is not free (an H100, SmolLM2-135M, a 64-row block: the attention kernels take
    1.95 ms per step over 4352 keys and 0.32 ms over 512; text_gpu_step_width4352_h100.json and
    text_gpu_step_width512_h100.json in benchmarks/results), so a step reads the narrowest width holding its rows."""
    widths, width = [], top_bucket
    while width < max_cache_len:
        widths.append(width)
        width *= 2
    return (*widths, max_cache_len)


class CommittedLengthCache(Cache):
    """Fixed-size layers plus a host-side committed length. Speaks the two calls the verifier makes on a cache:
    ``get_seq_length()`` and ``crop(-k)``."""

    def __init__(self, layers: list) -> None:
        super().__init__(layers=layers)
        self.length = 0

    @property
    def max_cache_len(self) -> int:
        """The layers' length (transformers 5.17 makes this a read-only property of ``Cache``; 5.23 does not)."""
        return self.layers[0].max_cache_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-k)`` forgets the last ``k`` rows, like transformers' 5.x layers (positive values raise)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove.")
        self.length += tokens_to_remove


class StaticTreeCache(CommittedLengthCache):
    """Fixed-size K/V for every layer, written at the rows ``IndexedStaticLayer`` is pointed at."""

    def __init__(self, num_layers: int, max_cache_len: int, rows: torch.Tensor) -> None:
        super().__init__([IndexedStaticLayer(max_cache_len, rows) for _ in range(num_layers)])

    def point(self, rows: torch.Tensor) -> None:
        """Every layer's index view for the next step (its length is the step's key width)."""
        for layer in self.layers:
            layer.rows = rows


class StaticForward(CausalLMForward, CapturedSteps):
    """``CausalLMForward`` on a static cache with bucketed, optionally CUDA-graph-captured steps.

    One adapter owns one cache (its buffers are what the graphs point at): ``new_cache()`` empties it and
    hands the same object back, so use one adapter per concurrent request. ``max_cache_len`` bounds
    prompt + new tokens + the largest bucket. ``compile`` runs inductor on the step before capture (fused
    kernels; logits may then differ from eager in the last bits): ``"layers"`` compiles the decoder layers'
    norms and MLPs (``LayerCompile``: seconds, not minutes), ``"dynamic"`` the whole step once for every bucket over
    the whole cache (symbolic sizes: minutes), ``"off"`` not at all. ``"layers"`` on a model whose layers are not found
    is ``"off"``."""

    def __init__(self, model, max_cache_len: int = 4096, buckets: tuple[int, ...] = BUCKETS,
                 capture: bool | None = None, compile: str = "off",
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(model, tree_attention=True, embed=embed)
        self.max_cache_len = max_cache_len
        self.buckets = tuple(sorted(buckets))
        # the whole-step compile traces every (bucket, width) graph: with all widths it did not finish in 6 minutes
        # on an H100 (one width: 206 s), so it keeps the whole cache as its only width
        self.widths = (max_cache_len,) if compile == "dynamic" else key_widths(max_cache_len, self.buckets[-1])
        self._calls = CapturedCalls(capture_supported(self.device) if capture is None else capture)
        top = self.buckets[-1]
        device = self.device
        on_cuda = device.type == "cuda"
        self._cols = torch.arange(max_cache_len, device=device)
        self._rows = torch.zeros(max_cache_len, dtype=torch.long, device=device)
        # ids | positions | past | real rows, copied to the device in one transfer per step
        self._host_int = torch.zeros(2 * top + 2, dtype=torch.long, pin_memory=on_cuda)
        self._host_block = torch.zeros(top, top, dtype=torch.bool, pin_memory=on_cuda)
        self._dev_int = torch.zeros(2 * top + 2, dtype=torch.long, device=device)
        self._dev_block = torch.zeros(top, top, dtype=torch.bool, device=device)
        self._staged = torch.cuda.Event() if on_cuda else None
        config = model.config
        self.cache = StaticTreeCache(config.num_hidden_layers, max_cache_len, self._rows)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # allocate now, outside any compiled or captured region, so the graphs see fixed buffers
        self.cache.early_initialization(1, heads, head_dim, self.dtype, device)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {compile!r}.")
        layers = decoder_layers(model) if compile == "layers" else None
        self.compile_mode = compile if compile != "layers" or layers is not None else "off"
        self._step_fn = self._step
        if self.compile_mode == "dynamic":
            self._step_fn = torch.compile(self._step, dynamic=True)
        elif layers is not None:
            self._step_fn = LayerCompile(layers).around(self._step)
        self.warmup_s = 0.0  # seconds spent compiling and capturing so far (the first steps of each bucket)
        self.loops: dict = {}  # device-resident decoding loops over this cache, kept with it (device_loop.loop_for)

    def new_cache(self) -> StaticTreeCache:
        self.cache.length = 0
        return self.cache

    def block_inputs(self, tree: TokenTree, before_root: int, past: int):
        """Host-side only: the block's own ``[q, q]`` visibility pattern and its positions. Each part of the pattern
        is written once, and a tree with nothing re-fed before it is its ancestor matrix alone: zeroing the whole
        block, then a lower triangle built from a matrix of ones, then copying the tree's part in took ~0.13 ms a
        step on a CPU after the forward (most of it the triangle, ~0.1 ms even when empty)."""
        m, n = before_root, len(tree)
        positions = [past + m + depth for depth in tree.depths]
        if not m:
            return tree.ancestor_matrix(), positions
        allowed = np.empty((m + n, m + n), dtype=bool)
        allowed[:m, :m] = np.tri(m, dtype=bool)
        allowed[:m, m:] = False
        allowed[m:, :m] = True
        tree.ancestor_matrix(out=allowed[m:, m:])
        return allowed, list(range(past, past + m)) + positions

    def fit(self, tree: TokenTree, before_root: int) -> TokenTree:
        """Re-fed rows count against the bucket the tree was sized for: a 64-node tree behind 2 re-fed rows would
        pad to 128, so it loses its last 2 nodes instead (input order: drafters put their likeliest nodes first).
        A re-fed block that needs a larger bucket anyway lets the tree fill that one."""
        size = self.bucket(max(before_root + 1, len(tree)))
        if size is None or before_root + len(tree) <= size:
            return tree
        return tree.truncated(max_nodes=size - before_root)

    @property
    def _top(self) -> int:
        return self.buckets[-1]

    def _staged_args(self, size: int, width: int) -> tuple[torch.Tensor, ...]:
        """Views of the device staging buffers for one bucket: ids, positions, (past, real rows), pattern, and the
        key columns of the step's width. Points the cache's layers at that width."""
        top = self._top
        self.cache.point(self._rows[:width])
        return (self._dev_int[None, :size], self._dev_int[None, top:top + size], self._dev_int[2 * top:],
                self._dev_block[:size, :size], self._cols[:width])

    def width(self, past: int, size: int) -> int:
        """The narrowest key width holding the committed rows and the padded block."""
        return next(w for w in self.widths if w >= past + size)

    def bucket(self, q: int) -> int | None:
        return next((b for b in self.buckets if b >= q), None)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, scalars: torch.Tensor,
              block: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows, additive mask over the step's key width (``cols``: the key columns) and the forward for one
        padded block; static shapes only. Returns the logits and the final hidden states of every row (the graphs
        keep both as outputs)."""
        size = ids.shape[1]
        past, real = scalars[0], scalars[1]
        index = self._cols[:size]
        self._rows[:size].copy_(index + past)
        relative = cols - past
        in_block = (relative >= 0) & (relative < size)
        visible = block[:, relative.clamp(0, size - 1)] & in_block[None, :]
        visible |= (relative < 0)[None, :] & (index < real)[:, None]
        # logical key positions (a block row holds its node's root + depth) for sliding layers' windows
        keys = torch.where(in_block, positions[0][relative.clamp(0, size - 1)], cols)
        mask = self.layout.masks(visible, positions[0], keys, self.dtype)
        inputs = {"inputs_embeds": self.embed(ids)} if self.embed is not None else {"input_ids": ids}
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                         output_hidden_states=True, past_key_values=self.cache)
        return out.logits[0], out.hidden_states[-1][0]

    def _replay(self, size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph of (bucket, key width), captured on first use (the warm-up runs are this very step, which is
        idempotent: same inputs, same rows written). A failed capture turns capture off for good."""
        key = (size, width)
        started, new = time.perf_counter(), key not in self.graphs
        # no inputs to copy in: the step reads the fixed staging buffers, whose views (and the layers' width) are
        # set up only where the step runs as Python: a replay has them in its graph
        outputs = self._calls.call(key, lambda: self._step_fn(*self._staged_args(size, width)),
                                   eager=lambda: self._step(*self._staged_args(size, width)))
        if new and key in self.graphs:
            self.warmup_s += time.perf_counter() - started
        return outputs

    def __call__(self, ids: list[int], position_ids, mask, cache, keep: int | None = None) -> torch.Tensor:
        """``mask`` is ``block_inputs``' ``[q, q]`` pattern, or None for a causal block (prompt, plain steps);
        ``position_ids`` a list (or tensor) of q positions. Returns logits ``[keep, vocab]``."""
        q, past = len(ids), cache.length
        positions = position_ids.flatten().tolist() if torch.is_tensor(position_ids) else list(position_ids)
        pattern = np.tril(np.ones((q, q), dtype=bool)) if mask is None else np.asarray(mask, dtype=bool)
        size = self.bucket(q)
        if size is None or past + size > self.max_cache_len:
            size = q  # oversize block (a long prompt): unpadded, eager
        if past + size > self.max_cache_len:
            raise ValueError(f"The static cache holds {self.max_cache_len} tokens; this step needs {past + size}.")
        if size > self._top:
            block = torch.from_numpy(pattern).to(self.device)
            scalars = torch.tensor([past, q], device=self.device)
            self.cache.point(self._rows)
            logits, hidden = self._step(torch.tensor([ids], device=self.device),
                                        torch.tensor([positions], device=self.device), scalars, block, self._cols)
        else:
            logits, hidden = self._staged_step(ids, positions, pattern, past, size)
        cache.length = past + q
        keep = q if keep is None else keep
        if self.record_hidden:
            self.hidden = hidden[q - keep:q].clone()
        return logits[q - keep:q].clone()

    def _staged_step(self, ids: list[int], positions: list[int], pattern: np.ndarray, past: int,
                     size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capture and not self.graphs and past == 0:
            self.warm()
        self._stage(ids, positions, pattern, past, size)
        width = self.width(past, size)
        return self._replay(size, width) if self.capture else self._step(*self._staged_args(size, width))

    def warm(self) -> None:
        """Compile and capture every (bucket, key width) now, on an empty cache (the first step of the first
        request), so that no later step, of any method, tree size or context length, waits for inductor or a
        capture. The dummy rows this writes sit beyond the committed length: hidden by the mask until real rows
        overwrite them."""
        for width in self.widths:
            for size in (b for b in self.buckets if b <= width):
                if not self.capture:
                    return  # a capture failed: eager from here on
                self._stage([0] * size, list(range(size)), np.tril(np.ones((size, size), dtype=bool)), 0, size)
                self._replay(size, width)

    def _stage(self, ids: list[int], positions: list[int], pattern: np.ndarray, past: int, size: int) -> None:
        """Write one block into the pinned buffers and start their copy to the device."""
        q, top = len(ids), self._top
        if self._staged is not None:
            self._staged.synchronize()  # the previous transfer has left the pinned buffers
        host = self._host_int.numpy()
        host[:size] = 0
        host[:q] = ids
        host[top:top + size] = past
        host[top:top + q] = positions
        host[2 * top:] = (past, q)
        block = self._host_block.numpy()
        block[:size, :size] = False
        block[:q, :q] = pattern
        dummies = np.arange(q, size)
        block[dummies, dummies] = True
        self._dev_int.copy_(self._host_int, non_blocking=True)
        self._dev_block.copy_(self._host_block, non_blocking=True)
        if self._staged is not None:
            self._staged.record()
