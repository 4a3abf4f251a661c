"""Token merging for speed (ToMe for SD): bipartite soft matching of self-attention tokens, unmerged after.

The mechanism of Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023), as ``tomesd`` applies it,
written for current diffusers and for capture in a CUDA graph:

* The tokens of a transformer block form an H×W grid. In every ``sx×sy`` cell one token, picked at random, is a
  destination; all others (and the leftover rows/columns) are sources.
* Each source finds its most similar destination (cosine similarity of the self-attention input). The
  ``r = ratio·N`` sources with the highest similarity are averaged into their destination; the rest stay.
* Self-attention (and optionally cross-attention and the MLP) runs on the ``N - r`` tokens; every merged source
  then receives its destination's output ("unmerge"), so the block still returns ``[B, N, C]``.

Installed by composition: forward hooks on each spatial ``BasicTransformerBlock``'s ``attn1`` (``attn2``,
``ff``), a pre-hook on its ``Transformer2DModel`` that reads the grid size, and one on the UNet that reads the
timestep. Attention processors are left alone, so the attention-control layer keeps working, and temporal
(motion) blocks of ``UNetMotionModel`` are never touched: 5-D video latents reach the spatial transformers with
the frames folded into the batch. ``remove_merging`` removes every hook, restoring the stock forward. What is
installed is kept in the UNet's ``state.UNetState`` (``installed_merging``).

Why it is faster than tomesd on a GPU, and capturable:

* Merge and unmerge are one ``index_add_`` and one ``index_select`` through a single token→slot map, instead of
  several gathers, scatters and concatenations. The sums are accumulated in fp32 (on CUDA with atomics, so the
  last bit of a merged token may vary between runs, as with tomesd's ``scatter_reduce``).
* The random destinations come from a table of layouts drawn once per grid shape from a seeded generator; the
  timestep and the block name pick the row, so each step and block gets its own layout, the same step always
  gets the same one, and no generator state or argsort over all N tokens is needed. The only sort is over the
  sources' best scores.
* Sources look for their destination inside their own 32×32-token tile (``window``): the similarity costs
  ¾N·256 dot products instead of ¾N·¼N (1 TFLOP per block at 2048 px). On image-like features the best
  destination is almost always a neighbour, so the merge is the same (tests/test_merging.py checks the
  reconstruction error). ``window=0`` matches globally as tomesd, in chunks keeping only each row's max, so the
  full similarity matrix (3.2 GB at 2048 px, the cause of tomesd's +45 % peak memory) never exists either way.
* Every branch depends on shapes only, so a captured graph replays the same work; per-step randomness enters
  through the timestep tensor. Run one eager call per shape before capturing (as CUDA graphs require anyway):
  it builds the cached index tensors.
* "Merge only where it pays": a block whose grid has fewer than ``min_tokens`` tokens runs stock, because at
  small token counts attention is cheap and the merge overhead would make the UNet slower.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .hooks import capture_safe
from .state import unet_state

# tomesd defaults: ratio 0.5, 2×2 cells, random destinations, merge self-attention only.
DEFAULT_RATIO = 0.5
# Below this many tokens per frame the merge costs more than it saves. 4096 is SD1.5's finest level at 512 px,
# where tomesd measured 1.05× (slower) on an H200; 16384 (1024 px) is where it first pays (0.87×). Measure with
# `benchmarks/image_speed.py --sizes 512,768,1024` before changing it.
DEFAULT_MIN_TOKENS = 8192
# Uncaptured CUDA calls wait on kernel launches, and merging adds launches: there it first pays at 16384 tokens
# (SD1.5 H200 eager: 1.12x slower at 768 px = 9216 tokens, 0.92x at 1024 px; image_speed_threshold_h200.json).
EAGER_CUDA_MIN_TOKENS = 16384
# Side of the tile, in tokens, within which sources look for destinations; 0 = the whole grid (tomesd).
DEFAULT_WINDOW = 32
# Largest similarity chunk (elements of sources × destinations × batch): 128 MiB in fp16.
DEFAULT_CHUNK_ELEMENTS = 2**26

# Random destination layouts per grid shape; (step, block) picks one of them.
LAYOUTS = 256


@dataclass(frozen=True)
class MergeConfig:
    ratio: float = DEFAULT_RATIO
    max_downsample: int | None = None  # None: the finest level that has attention (1 on SD1.5, 2 on SDXL)
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    merge_attn: bool = True
    merge_crossattn: bool = False  # tomesd: "not recommended"; merged queries would blur cross-attention maps
    merge_mlp: bool = False  # tomesd: "very not recommended"
    min_tokens: int = DEFAULT_MIN_TOKENS
    window: int = DEFAULT_WINDOW  # k: sources see only destinations in their k×k-token tile; 0: all (tomesd)
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    # plan once per spatial transformer and reuse it in its deeper blocks (SDXL stacks 2 or 10 per level):
    # one similarity search instead of ten, on tokens that change little from block to block
    share_plan: bool = False


@dataclass
class MergePlan:
    """Where every token of a ``[B, N, C]`` batch goes: ``slots[b*N + n]`` is its row in the merged
    ``[B*M, C]`` tensor; ``inverse_counts`` turns the summed slots into means."""

    batch: int
    tokens: int
    merged_tokens: int
    slots: torch.Tensor
    inverse_counts: torch.Tensor

    @property
    def removed(self) -> int:
        return self.tokens - self.merged_tokens


def merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """``[B, N, C] -> [B, N - r, C]``: every slot is the mean of its tokens (accumulated in fp32)."""
    batch, tokens, channels = x.shape
    summed = x.new_zeros(batch * plan.merged_tokens, channels, dtype=torch.float32)
    summed.index_add_(0, plan.slots, x.reshape(batch * tokens, channels).float())
    return summed.mul_(plan.inverse_counts).to(x.dtype).view(batch, plan.merged_tokens, channels)


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """``[B, N - r, C] -> [B, N, C]``: every token receives its slot's output."""
    channels = y.shape[-1]
    return y.reshape(-1, channels).index_select(0, plan.slots).view(plan.batch, plan.tokens, channels)


class _Constants:
    """Index tensors that depend only on shapes, built once per shape and device (never during a capture,
    where kernels do not run and a cached tensor would hold garbage)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def get(self, key: tuple, build):
        value = self._cache.get(key)
        if value is None:
            value = build()
            if not _capturing():
                self._cache[key] = value
        return value


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_CONSTANTS = _Constants()


def _cell_layout(h: int, w: int, sx: int, sy: int, tile: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of each full ``sx×sy`` cell, ``[cells, sx*sy]``, and the leftover positions (sources).
    With ``tile`` (a side dividing h and w) the cells are listed tile by tile."""
    def build():
        rows = torch.arange(h // sy * sy, device=device).view(h // sy, sy)
        cols = torch.arange(w // sx * sx, device=device).view(w // sx, sx)
        cells = rows[:, None, :, None] * w + cols[None, :, None, :]  # [cell row, cell col, sy, sx]
        if tile:
            ty, tx = tile // sy, tile // sx
            cells = cells.view(h // tile, ty, w // tile, tx, sy, sx).permute(0, 2, 1, 3, 4, 5)
        cells = cells.reshape(-1, sy * sx)
        covered = torch.zeros(h, w, dtype=torch.bool, device=device)
        covered[: h // sy * sy, : w // sx * sx] = True
        leftover = torch.arange(h * w, device=device)[~covered.view(-1)]
        return cells, leftover
    return _CONSTANTS.get(("cells", h, w, sx, sy, tile, str(device)), build)


def destination_offsets(cells: int, cell_size: int, seed: int, layout: torch.Tensor | int,
                        device: torch.device) -> torch.Tensor:
    """The destination of every cell (an index in ``[0, sx*sy)``) in random layout number ``layout``."""
    def build():
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(cell_size, (LAYOUTS, cells), generator=generator, dtype=torch.int16).to(device)
    table = _CONSTANTS.get(("layouts", cells, cell_size, seed, str(device)), build)
    if isinstance(layout, int):
        return table[layout % LAYOUTS].long()
    return table.index_select(0, layout.reshape(-1)[:1].to(device) % LAYOUTS).view(-1).long()


def partition(h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None, device: torch.device,
              tile: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(source positions, destination positions) of an h×w grid, tile by tile when ``tile`` is set;
    ``offsets=None`` picks each cell's first token."""
    cells, leftover = _cell_layout(h, w, sx, sy, tile, device)
    size = sx * sy
    if offsets is None:
        def build():
            return torch.cat([cells[:, 1:].reshape(-1), leftover]), cells[:, 0].contiguous()
        return _CONSTANTS.get(("fixed", h, w, sx, sy, tile, str(device)), build)
    k = _CONSTANTS.get(("k", size, str(device)), lambda: torch.arange(size - 1, device=device))
    dst = cells.gather(1, offsets[:, None]).squeeze(1)
    src = cells.gather(1, k + (k >= offsets[:, None]).long()).reshape(-1)
    return torch.cat([src, leftover]), dst


def best_destinations(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                      groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row of ``a [B, Na, C]``: cosine similarity to its best row of ``b [B, Nb, C]`` and its
    index, computed in row chunks so that at most ``chunk_elements`` scores exist at once. With ``groups``,
    sources and destinations are split into that many consecutive groups and only matched within their group."""
    if groups > 1:
        (batch, sources, channels), targets = a.shape, b.shape[1]
        score, local = best_destinations(a.reshape(batch * groups, sources // groups, channels),
                                         b.reshape(batch * groups, targets // groups, channels), chunk_elements)
        offset = _CONSTANTS.get(("groups", groups, targets, str(a.device)), lambda: torch.arange(
            0, targets, targets // groups, device=a.device)[:, None])
        return score.view(batch, sources), (local.view(batch, groups, -1) + offset).view(batch, sources)
    batch, sources, _ = a.shape
    b_t = F.normalize(b, dim=-1).transpose(1, 2)
    rows = max(1, chunk_elements // max(1, batch * b.shape[1]))
    values, indices = [], []
    for start in range(0, sources, rows):
        v, i = torch.matmul(a[:, start:start + rows], b_t).max(dim=-1)
        values.append(v)
        indices.append(i)
    best = values[0] if len(values) == 1 else torch.cat(values, dim=1)
    index = indices[0] if len(indices) == 1 else torch.cat(indices, dim=1)
    # max over destinations does not depend on the source's norm, so normalise after the max (one pass fewer).
    return best.float() / torch.linalg.vector_norm(a, dim=-1).float().clamp_min(1e-6), index


def plan_merge(x: torch.Tensor, h: int, w: int, ratio: float, sx: int = 2, sy: int = 2,
               layout: torch.Tensor | int | None = 0, seed: int = 0, window: int = 0,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> MergePlan | None:
    """Bipartite soft matching of the tokens ``x [B, h*w, C]``. Destinations: random layout number ``layout``
    of the table drawn from ``seed``, or each cell's top-left token when ``layout`` is None (tomesd's
    ``use_rand=False``). ``window``: sources only look for destinations inside their ``window×window`` tile
    (when it tiles the grid); 0 compares with every destination, as tomesd. ``None`` when nothing would merge."""
    batch, tokens, _ = x.shape
    device = x.device
    cells = (h // sy) * (w // sx)
    tiled = window > 0 and h % window == 0 and w % window == 0 and window % sx == 0 and window % sy == 0
    tile = window if tiled and window * window < h * w else 0
    offsets = None if layout is None else destination_offsets(cells, sx * sy, seed, layout, device)
    src_pos, dst_pos = partition(h, w, sx, sy, offsets, device, tile)
    n_src, n_dst = src_pos.numel(), dst_pos.numel()
    r = min(int(tokens * ratio), n_src)
    if r <= 0 or n_dst == 0:
        return None
    merged_tokens = tokens - r
    groups = (h // tile) * (w // tile) if tile else 1
    score, best = best_destinations(x.index_select(1, src_pos), x.index_select(1, dst_pos), chunk_elements, groups)
    order = score.argsort(dim=1, descending=True)

    def build_templates():
        ranks = torch.arange(n_src, device=device)
        dst_slots = torch.arange(n_src - r, n_src - r + n_dst, device=device)
        return ranks < r, ranks - r, dst_slots, torch.arange(batch, device=device)[:, None] * merged_tokens
    is_merged, kept_slot, dst_slots, batch_offset = _CONSTANTS.get(
        ("slots", batch, n_src, n_dst, r, str(device)), build_templates)
    # Sources in descending similarity: the first r go into their destination's slot, the rest keep a slot each.
    src_slots = torch.where(is_merged, best.gather(1, order) + (n_src - r), kept_slot)
    slots = torch.empty(batch, tokens, dtype=torch.long, device=device)
    slots.scatter_(1, dst_pos.expand(batch, -1), dst_slots.expand(batch, -1))
    slots.scatter_(1, src_pos[order], src_slots)
    slots = (slots + batch_offset).view(-1)
    counts = torch.zeros(batch * merged_tokens, 1, dtype=torch.float32, device=device)
    counts.index_add_(0, slots, torch.ones(batch * tokens, 1, dtype=torch.float32, device=device))
    return MergePlan(batch, tokens, merged_tokens, slots, counts.reciprocal_())


@dataclass
class MergeStats:
    """Counted in eager calls and during a capture (a replayed CUDA graph runs no Python)."""

    tokens_merged: int = 0  # summed over every block call: removed tokens × batch rows
    tokens_merged_last_call: int = 0  # in the last UNet call
    blocks_merged_last_call: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"tokens_merged": self.tokens_merged, "tokens_merged_per_call": self.tokens_merged_last_call,
                "blocks_merged_per_call": self.blocks_merged_last_call}

    def last_call(self) -> tuple[int, int]:
        """Tokens and blocks merged in the last UNet call."""
        return self.tokens_merged_last_call, self.blocks_merged_last_call

    def add_call(self, last_call: tuple[int, int]) -> None:
        """Count a UNet call that ran no Python (a replayed CUDA graph) as the call it replays."""
        self.tokens_merged += last_call[0]
        self.tokens_merged_last_call, self.blocks_merged_last_call = last_call

    def restore(self, saved: "MergeStats") -> None:
        """Back to ``saved``'s counts (a capture's warm-up and recording calls are not generations)."""
        self.tokens_merged, self.tokens_merged_last_call, self.blocks_merged_last_call = (
            saved.tokens_merged, saved.tokens_merged_last_call, saved.blocks_merged_last_call)


@dataclass
class _Grid:
    """The latest token grid (h, w) seen by one spatial transformer, and its first block's plan."""

    hw: tuple[int, int] = (0, 0)
    plan: "MergePlan | None" = None


@dataclass
class _Run:
    step: torch.Tensor | int = 0  # the timestep in quarter units: picks the random layout of this UNet call
    stats: MergeStats = field(default_factory=MergeStats)

    @capture_safe("merging: timestep")  # reads the call's timestep tensor on the device
    def start_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """UNet pre-hook: this call's layout key from its timestep; the per-call counters start at zero."""
        self.step = _step_key(args[1] if len(args) > 1 else kwargs.get("timestep"))
        self.stats.tokens_merged_last_call = 0
        self.stats.blocks_merged_last_call = 0


def _step_key(timestep: Any) -> torch.Tensor | int:
    if isinstance(timestep, torch.Tensor):
        return (timestep.reshape(-1)[:1].float() * 4).round().long()
    return round(float(timestep or 0) * 4)


def _first_arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _replace_first(args: tuple, kwargs: dict, name: str, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


class BlockMerger:
    """The object installed on one ``BasicTransformerBlock``: plans the merge on ``attn1``'s input, merges the
    inputs of the chosen sublayers and unmerges their outputs."""

    def __init__(self, name: str, config: MergeConfig, grid: _Grid, run: _Run, first: bool = True) -> None:
        self.name, self.config, self.grid, self.run = name, config, grid, run
        self.salt = zlib.crc32(name.encode()) % LAYOUTS  # blocks differ, and keep their layout across installs
        self.first = first  # the transformer's first block (plans for the others when plans are shared)
        self.plan: MergePlan | None = None

    def start(self, x: torch.Tensor) -> None:
        h, w = self.grid.hw
        self.plan = None
        if x.ndim != 3 or x.shape[1] != h * w or h * w < self.config.min_tokens:
            return
        c = self.config
        if c.share_plan and not self.first:
            shared = self.grid.plan
            self.plan = shared if shared is not None and shared.tokens == x.shape[1] else None
        else:
            layout = self.run.step + self.salt if c.use_rand else None
            self.plan = plan_merge(x, h, w, c.ratio, c.sx, c.sy, layout, c.seed, c.window, c.chunk_elements)
            self.grid.plan = self.plan
        if self.plan is not None:
            self.run.stats.tokens_merged += self.plan.removed * self.plan.batch
            self.run.stats.tokens_merged_last_call += self.plan.removed * self.plan.batch
            self.run.stats.blocks_merged_last_call += 1

    def merge_input(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = _first_arg(args, kwargs, "hidden_states")
        plan = self.plan
        if plan is None or x is None or x.ndim != 3 or x.shape[:2] != (plan.batch, plan.tokens):
            return None
        return _replace_first(args, kwargs, "hidden_states", merge(x, plan))

    def unmerge_output(self, output: Any) -> Any:
        plan = self.plan
        if plan is None or not isinstance(output, torch.Tensor) or output.shape[:2] != (plan.batch, plan.merged_tokens):
            return None
        return unmerge(output, plan)


@dataclass
class TokenMerging:
    """What ``apply_merging`` installed: one merger per patched block, the hooks, and the merge counters."""

    config: MergeConfig
    stats: MergeStats
    mergers: list[BlockMerger] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)

    @property
    def blocks(self) -> list[str]:
        return [merger.name for merger in self.mergers]

    @property
    def active(self) -> bool:
        """Whether any hook is installed (``ratio=0`` or no eligible block installs none)."""
        return bool(self.hooks)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def spatial_transformers(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, Transformer2DModel, downsample factor)`` for every spatial transformer of a diffusers UNet
    (``UNet2DConditionModel``, ``UNetMotionModel``), from its structure: each downsampler halves the grid."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found: list[tuple[str, nn.Module, int]] = []

    def collect(prefix: str, block: nn.Module | None, factor: int) -> None:
        for j, module in enumerate(getattr(block, "attentions", None) or []):
            if isinstance(module, Transformer2DModel):
                found.append((f"{prefix}.attentions.{j}", module, factor))

    factor = 1
    for i, block in enumerate(unet.down_blocks):
        collect(f"down_blocks.{i}", block, factor)
        if getattr(block, "downsamplers", None):
            factor *= 2
    collect("mid_block", getattr(unet, "mid_block", None), factor)
    for i, block in enumerate(unet.up_blocks):
        collect(f"up_blocks.{i}", block, factor)
        if getattr(block, "upsamplers", None):
            factor //= 2
    return found


def merge_settings(arch: str, backend: str, device: torch.device | str) -> dict[str, Any]:
    """``apply_merging`` arguments for the image tab: where merging pays on this model, fast-path ``backend``
    (diffusion/fast.py) and device (H200 measurements, benchmarks/results/image_speed_*_h200.json).

    Uncaptured CUDA calls (``off``/``eager``: ZeroGPU, the fast toggle off) wait on kernel launches and
    merging adds launches, so there a grid needs 16384 tokens. SDXL also merges its 10-deep 1280-channel level
    once it has 4096 tokens (2048 px), with one plan per spatial transformer: 0.82x vanilla at 2048 px, 1.00x
    at 1024 px (per-block plans: 0.88x; the finest level alone: 0.91x). SD1.5 also merges its second level
    (downsample 2) where that grid reaches ``min_tokens`` itself (above ~1450 px; 128x128 at 2048 px): 0.50x
    vanilla at 2048 px instead of 0.54x for the finest level alone (image_speed_sd15_h200.json, window 32);
    at 1024 px and below that level stays stock, so nothing changes there."""
    if torch.device(device).type == "cuda" and backend in ("off", "eager"):
        where = {"min_tokens": EAGER_CUDA_MIN_TOKENS}
    elif arch == "sdxl":
        where = {"max_downsample": 4, "min_tokens": 4096}
    else:
        where = {"max_downsample": 2, "min_tokens": DEFAULT_MIN_TOKENS}
    return {**where, "share_plan": True}


def apply_merging(unet: nn.Module, ratio: float = DEFAULT_RATIO, max_downsample: int | None = None, *,
                  sx: int = 2, sy: int = 2, use_rand: bool = True, seed: int = 0, merge_attn: bool = True,
                  merge_crossattn: bool = False, merge_mlp: bool = False, min_tokens: int = DEFAULT_MIN_TOKENS,
                  window: int = DEFAULT_WINDOW, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                  share_plan: bool = False) -> TokenMerging:
    """Install token merging on the spatial transformer blocks of ``unet`` whose downsample factor is at most
    ``max_downsample`` (tomesd's meaning; ``None`` = the finest level with attention). Replaces any previous
    installation; ``ratio=0`` installs nothing, so the UNet is stock."""
    if not 0 <= ratio < 1:
        raise ValueError(f"Token merging ratio must be in [0, 1), got {ratio}.")
    if sx < 1 or sy < 1:
        raise ValueError(f"Strides must be positive, got sx={sx}, sy={sy}.")
    remove_merging(unet)
    config = MergeConfig(ratio, max_downsample, sx, sy, use_rand, seed, merge_attn, merge_crossattn, merge_mlp,
                         min_tokens, window, chunk_elements, share_plan)
    run = _Run()
    handle = TokenMerging(config, run.stats)
    unet_state(unet).merging = handle
    transformers = spatial_transformers(unet)
    if ratio == 0 or not transformers or not (merge_attn or merge_crossattn or merge_mlp):
        return handle
    limit = min(f for _, _, f in transformers) if max_downsample is None else max_downsample
    chosen = [(name, module) for name, module, factor in transformers if factor <= limit]
    if not chosen:
        return handle

    handle.hooks.append(unet.register_forward_pre_hook(run.start_call, with_kwargs=True))

    for name, transformer in chosen:
        grid = _Grid()

        def on_transformer(module, args, kwargs, grid=grid):
            x = _first_arg(args, kwargs, "hidden_states")
            grid.hw = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else (0, 0)
            grid.plan = None
        handle.hooks.append(transformer.register_forward_pre_hook(on_transformer, with_kwargs=True))
        for k, block in enumerate(transformer.transformer_blocks):
            merger = BlockMerger(f"{name}.transformer_blocks.{k}", config, grid, run, first=k == 0)
            handle.mergers.append(merger)
            handle.hooks.extend(_hook_block(block, merger))
    return handle


def _hook_block(block: nn.Module, merger: BlockMerger) -> list[RemovableHandle]:
    config = merger.config
    hooks: list[RemovableHandle] = []

    def plan_and_merge(module, args, kwargs):
        merger.start(_first_arg(args, kwargs, "hidden_states"))
        return merger.merge_input(args, kwargs) if config.merge_attn else None
    hooks.append(block.attn1.register_forward_pre_hook(plan_and_merge, with_kwargs=True))
    wrapped = [block.attn1] if config.merge_attn else []
    if config.merge_crossattn and getattr(block, "attn2", None) is not None:
        wrapped.append(block.attn2)
    if config.merge_mlp:
        wrapped.append(block.ff)
    for module in wrapped:
        if module is not block.attn1:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs: merger.merge_input(args, kwargs), with_kwargs=True))
        hooks.append(module.register_forward_hook(lambda m, args, output: merger.unmerge_output(output)))
    return hooks


def installed_merging(unet: nn.Module) -> TokenMerging | None:
    """What ``apply_merging`` installed on ``unet`` (None when nothing is); kept in its ``state.UNetState``."""
    return unet_state(unet).merging


def remove_merging(unet: nn.Module) -> None:
    """Remove everything ``apply_merging`` installed; the UNet runs its stock forward again."""
    state = unet_state(unet)
    handle, state.merging = state.merging, None
    if handle is not None:
        handle.remove()


def merging_stats(unet: nn.Module) -> dict[str, int]:
    """Counters for the stats panel ("tokens merged"); zeros when merging is off."""
    handle = installed_merging(unet)
    return handle.stats.as_dict() if handle is not None else MergeStats().as_dict()
