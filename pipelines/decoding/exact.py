"""Exact mode: a forward whose result for a row depends only on that row's own path (its token, position and
the tokens before it), never on how many rows the step holds or where the other rows sit. Plain decoding and
every drafted method run through it, so drafted greedy output is bit-identical to plain decoding in this mode.

Why the default paths are not exact in low precision: a tree step is a wider matrix product (another M, so
another kernel or split of the reduction) and its attention sums a node's keys at other cache slots than plain
decoding would, so each logit and each K/V written to the cache moves in its last bits and near-ties flip.

How this forward removes both causes:

- **One shape.** Every forward has exactly ``rows`` rows (padded; longer blocks go in several forwards) over
  a static cache of fixed length, so every matrix product has the same M, N, K and runs the same kernel. A
  kernel computes each row of a fixed-shape product with the same reduction order (there is no cross-row
  arithmetic), and with ``rows`` at most one GEMM tile high (64) a split or stream-K schedule, which is
  chosen per output tile, is the same for every row.
- **Each row is its own sequence.** The ``rows`` rows go in as a batch of length-1 sequences. The cache keeps
  one copy of the K/V, and each layer hands attention a per-row *gathered* view in which the key at logical
  position ``j`` of the row's path sits at index ``j``: the canonical layout plain decoding has. Attention of
  one row is then one batch element of a fixed-shape kernel, summing the same keys in the same order whether
  the row is plain decoding's token, a re-fed token or a tree node whose ancestors sit anywhere in the block.

Measured on the CPU in bf16 (tiny Llamas, hidden 128-512): the products were already shape-invariant (a row at
M=1 and at M=16 equal bit for bit), but a tree node attending at other slots than plain decoding moved its logits
by up to 0.005, which flipped near-ties in 7 of 8 prompts of a near-tie model; with this forward, 0 of 8. fp32
alone is not the fix: it shrinks the moves, it does not remove them, and only where the order of a sum is fixed
is the result fixed. A chain-only mode (trees cut to their first chain, which already sits at plain decoding's
slots) keeps the slots but not the shapes, so it is not exact on a GPU either, and it gives up the trees.

The price is the gather (``rows`` x cache length keys per layer) and padding plain steps to ``rows`` rows;
``benchmarks/text_served.py --exact`` measures it on the GPU.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import StaticLayer

from .captured import CapturedCalls, CapturedSteps, capture_supported
from .static import CommittedLengthCache
from .tree import TokenTree, block_position_ids, block_visibility
from .verify import CausalLMForward


EXACT_ROWS = 16  # rows of every forward: one GEMM tile high, and few enough that a plain step stays cheap
EXACT_BLOCK = 256  # rows of one verifier block staged at once; longer blocks must start with a causal chain


class CanonicalLayer(StaticLayer):
    """One layer's K/V, stored once in cache-slot order and read by every row in its own canonical order:
    ``update`` writes the step's rows at ``slots`` and returns keys/values ``[rows, heads, length, dim]`` taken
    at ``gather[row]`` (gather index ``j`` holds the slot of the key at logical position ``j``)."""

    def __init__(self, max_cache_len: int, slots: torch.Tensor, gather: torch.Tensor) -> None:
        super().__init__(max_cache_len)
        self.slots, self.gather = slots, gather

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.slots, key_states.transpose(0, 2))  # [rows, h, 1, d] -> [1, h, rows, d]
        self.values.index_copy_(2, self.slots, value_states.transpose(0, 2))
        return self.keys[0][:, self.gather].transpose(0, 1), self.values[0][:, self.gather].transpose(0, 1)


class CanonicalCache(CommittedLengthCache):
    """The layers above, each writing its rows' K/V and handing attention the per-row canonical layout."""

    def __init__(self, num_layers: int, max_cache_len: int, slots: torch.Tensor, gather: torch.Tensor) -> None:
        super().__init__([CanonicalLayer(max_cache_len, slots, gather) for _ in range(num_layers)])


class ExactForward(CausalLMForward, CapturedSteps):
    """``CausalLMForward`` with row-invariant numerics (see the module docstring); pass it as ``forward=`` to
    both ``plain_decode`` and ``speculative_decode``. ``max_cache_len`` bounds prompt + new tokens + ``rows``;
    the comparison is exact between runs of one adapter configuration (same ``rows`` and ``max_cache_len``).
    ``capture=None`` replays one CUDA graph on a dedicated GPU and runs the same step eagerly elsewhere. Never
    inductor-compiled: its fused kernels would be one more thing to keep shape-invariant."""

    def __init__(self, model, max_cache_len: int = 4096, rows: int = EXACT_ROWS, block: int = EXACT_BLOCK,
                 capture: bool | None = None, embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(model, tree_attention=True, embed=embed)
        self.max_cache_len, self.rows, self.block = max_cache_len, rows, block
        self._calls = CapturedCalls(capture_supported(self.device) if capture is None else capture)
        device = self.device
        self._cols = torch.arange(max_cache_len + 1, device=device)  # the last column takes hidden scatters
        self._row_index = torch.arange(rows, device=device)
        self._block_index = torch.arange(block, device=device)
        self._slots = torch.zeros(rows, dtype=torch.long, device=device)
        self._gather = torch.zeros(rows, max_cache_len, dtype=torch.long, device=device)
        # staged per block: ids | positions | (block's first slot, chunk's first row); the block's pattern
        self._ints = torch.zeros(2 * block + 2, dtype=torch.long, device=device)
        self._pattern = torch.zeros(block, block, dtype=torch.bool, device=device)
        config = model.config.get_text_config(decoder=True)
        self.cache = CanonicalCache(config.num_hidden_layers, max_cache_len, self._slots, self._gather)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache.early_initialization(1, heads, head_dim, self.dtype, device)
        self.warmup_s = 0.0  # seconds spent capturing (the first step)

    def new_cache(self) -> CanonicalCache:
        self.cache.length = 0
        return self.cache

    def block_inputs(self, tree: TokenTree, before_root: int, past: int):
        """The block's own ``[q, q]`` visibility pattern and its positions (both host-side)."""
        return block_visibility(tree, before_root, 0), block_position_ids(tree, before_root, past, torch.device("cpu"))

    def __call__(self, ids: list[int], position_ids, mask, cache, keep: int | None = None) -> torch.Tensor:
        """Logits ``[keep, vocab]`` of the last ``keep`` rows; ``mask`` is ``block_inputs``' pattern or None
        (causal). A block longer than ``block`` rows must begin with a causal chain (a prompt): its leading
        rows go first, as blocks of their own."""
        q, past = len(ids), cache.length
        positions = position_ids.flatten().tolist() if torch.is_tensor(position_ids) else list(position_ids)
        pattern = np.tril(np.ones((q, q), dtype=bool)) if mask is None else np.asarray(mask, dtype=bool)
        if past + q + self.rows > self.max_cache_len:
            raise ValueError(f"The exact cache holds {self.max_cache_len} tokens; "
                             f"this step needs {past + q + self.rows}.")
        lead = max(0, q - self.block)
        causal_lead = np.array_equal(pattern[:lead, :lead], np.tril(np.ones((lead, lead), dtype=bool)))
        if not causal_lead or not pattern[lead:, :lead].all():
            raise ValueError(f"A block of more than {self.block} rows must start with a causal chain.")
        keep = q if keep is None else keep
        logits, hidden = [], []
        starts = list(range(0, lead, self.block)) + [lead]
        for start, end in zip(starts, starts[1:] + [q]):
            block_logits, block_hidden = self._run_block(ids[start:end], positions[start:end],
                                                         pattern[start:end, start:end], past + start,
                                                         wanted=max(0, (q - keep) - start))
            logits.append(block_logits)
            hidden.append(block_hidden)
        cache.length = past + q
        if self.record_hidden:
            self.hidden = torch.cat(hidden)[-keep:]
        return torch.cat(logits)[-keep:]

    def _run_block(self, ids: list[int], positions: list[int], pattern: np.ndarray, past: int,
                   wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage one block and run it ``rows`` at a time; returns the logits and hidden states of its rows from
        ``wanted`` on (earlier rows are not needed by the caller)."""
        n, block = len(ids), self.block
        ints = np.zeros(2 * block + 2, dtype=np.int64)
        ints[:n] = ids
        ints[block:2 * block] = past  # padding rows: at the block's first position, seeing the prefix and themselves
        ints[block:block + n] = positions
        ints[2 * block] = past
        staged = np.zeros((block, block), dtype=bool)
        staged[:n, :n] = pattern
        padding = np.arange(n, block)
        staged[padding, padding] = True
        self._pattern.copy_(torch.from_numpy(staged))
        logits, hidden = [], []
        for start in range(0, n, self.rows):
            ints[2 * block + 1] = start
            self._ints.copy_(torch.from_numpy(ints))
            chunk_logits, chunk_hidden = self._replay() if self.capture else self._step()
            first, last = max(wanted - start, 0), min(n - start, self.rows)
            if first < last:
                logits.append(chunk_logits[first:last].clone())
                hidden.append(chunk_hidden[first:last].clone())
        empty = torch.empty(0, device=self.device)
        return (torch.cat(logits) if logits else empty), (torch.cat(hidden) if hidden else empty)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One fixed-shape forward of ``rows`` rows read from the staging buffers (capturable: no host values)."""
        block, length = self.block, self.max_cache_len
        ids_all, positions_all = self._ints[:block], self._ints[block:2 * block]
        past, start = self._ints[2 * block], self._ints[2 * block + 1]
        rows = start + self._row_index
        self._slots.copy_(past + rows)
        positions = positions_all[rows]
        # gather index j = slot of the key at logical position j: the committed prefix is already canonical
        # (slot == position); block keys a row sees are moved to their positions, hidden ones to a spare column
        targets = torch.where(self._pattern[rows], positions_all[None, :], length)
        gather = self._cols.expand(self.rows, length + 1).clone()
        gather.scatter_(1, targets, (past + self._block_index)[None].expand(self.rows, block))
        self._gather.copy_(gather[:, :length])
        keys = self._cols[:length]
        mask = self.layout.masks(keys[None, :] <= positions[:, None], positions, keys, self.dtype)
        mask = ({kind: m[0, 0][:, None, None] for kind, m in mask.items()} if isinstance(mask, dict)
                else mask[0, 0][:, None, None])
        ids = ids_all[rows][:, None]
        inputs = {"inputs_embeds": self.embed(ids)} if self.embed is not None else {"input_ids": ids}
        out = self.model(**inputs, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                         output_hidden_states=True, past_key_values=self.cache)
        return out.logits[:, 0], out.hidden_states[-1][:, 0]

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one CUDA graph, captured on first use (warm-up runs are this very step: same inputs, same rows
        written); no inputs to copy in, the step reads the staging buffers."""
        started, new = time.perf_counter(), self.rows not in self.graphs
        outputs = self._calls.call(self.rows, self._step)
        if new and self.rows in self.graphs:
            self.warmup_s += time.perf_counter() - started
        return outputs
