"""The one attention-control layer of the image (and video) tab: diffusers attention processors on named
cross-attention layers that (a) record attention probabilities of chosen tokens at chosen steps and (b) add a
bias (including -inf, true masking) to chosen key columns for chosen query regions, layers and steps, and
(c) add one token's key to another's (``KeyShare``).

Usage::

    control = AttentionControl(unet)
    control.biases.append(KeyBias(tokens=[5, 6], layers=lambda n: n.startswith("up_blocks.1"),
                                  timesteps=(300, 650)))
    recorder = control.record(tokens=[2, 5], layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"])
    with control:                      # installs processors only on the layers something applies to
        pipe(..., callback_on_step_end=control.step_callback)
    heat = recorder.aggregate()        # [batch, h, w, tokens]

Why processors and not a patched UNet: the processor API is diffusers' stable extension point. Why explicit
probabilities only where recorded: ``AttnProcessor2_0`` runs SDPA, which never materialises them, and the
explicit path costs memory. When a layer has nothing to do at a call, its original processor runs, so with
every control off the output is bit-identical to the stock pipeline. Per-run state (step, timestep, CFG layout)
lives on the control object rather than in ``cross_attention_kwargs`` because diffusers filters those kwargs
against each processor's signature and sends them to self- and cross-attention alike.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .hooks import capture_safe

LayerFilter = Callable[[str], bool] | Collection[str] | None


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Module names of every cross-attention (``attn2``) layer of the spatial transformers, in UNet order."""
    return [name for name, module in unet.named_modules()
            if name.endswith("attn2") and getattr(module, "is_cross_attention", False) and "motion_modules" not in name]


def cross_attention_levels(unet: torch.nn.Module) -> dict[str, int]:
    """How many times each cross-attention layer's input is halved from the latent, read from where the UNet's
    blocks down- and upsample (so any diffusers UNet works, whatever its depth or which levels have attention)."""
    layers = cross_attention_layers(unet)
    levels: dict[str, int] = {}

    def assign(prefix: str, level: int) -> None:
        levels.update({name: level for name in layers if name.startswith(prefix)})

    level = 0
    for index, block in enumerate(unet.down_blocks):
        assign(f"down_blocks.{index}.", level)
        level += getattr(block, "downsamplers", None) is not None
    assign("mid_block.", level)
    for index, block in enumerate(unet.up_blocks):
        assign(f"up_blocks.{index}.", level)
        level -= getattr(block, "upsamplers", None) is not None
    return levels


def level_grid(level: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the query grid ``level`` halvings below the latent (a stride-2 convolution rounds up)."""
    height, width = latent_hw
    return math.ceil(height / 2**level), math.ceil(width / 2**level)


def layer_grids(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each cross-attention layer's query grid for a latent of ``latent_hw``."""
    return {name: level_grid(level, latent_hw) for name, level in cross_attention_levels(unet).items()}


def layer_matches(layers: LayerFilter, name: str) -> bool:
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(name))
    return name in layers


def query_grid(num_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's query grid given the latent size: each UNet level halves (rounding up)."""
    height, width = latent_hw
    for level in range(8):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        if h * w == num_queries:
            return h, w
    raise ValueError(f"Cannot place {num_queries} queries on a grid derived from latent size {latent_hw}.")


@dataclass
class KeyBias:
    """Add ``value`` to the logits of key columns ``tokens`` for the queries inside ``region``.

    ``region`` is an [H, W] mask over the image at any resolution (resized nearest to each layer's grid);
    None means every query. ``timesteps`` is an inclusive window in scheduler timestep units, ``steps`` a
    collection of step indices; both None means always. ``rows="cond"`` touches only the conditional half of a
    classifier-free-guidance batch (token positions belong to the positive prompt); ``"all"`` every row.
    """

    tokens: Sequence[int]
    value: float = float("-inf")
    layers: LayerFilter = None
    region: torch.Tensor | None = None
    timesteps: tuple[float, float] | None = None
    steps: Collection[int] | None = None
    rows: str | slice = "cond"  # a slice: these batch rows (video: one shot's frames of the conditional half)
    label: str = ""

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]
        if self.value == float("-inf") and 0 in self.tokens:
            raise ValueError("A -inf bias on key 0 (the start token) could leave a query with no key to attend to.")
        if not isinstance(self.rows, slice) and self.rows not in {"cond", "all"}:
            raise ValueError(f"rows must be 'cond' or 'all', got {self.rows!r}")

    def active(self, name: str, step: int, timestep: float | None) -> bool:
        if not self.tokens or not layer_matches(self.layers, name):
            return False
        if self.steps is not None and step not in self.steps:
            return False
        if self.timesteps is not None:
            low, high = self.timesteps
            if timestep is None or not (low <= timestep <= high):
                return False
        return True


@dataclass
class KeyShare:
    """Add token ``source``'s key to token ``target``'s key, so every query's logit for ``target`` gains its logit
    for ``source`` (Compass Control's ``class2special_soft``: the compass token's key gets its object's key).
    ``rows`` as for ``KeyBias``."""

    target: int
    source: int
    layers: LayerFilter = None
    rows: str | slice = "cond"

    def active(self, name: str, num_keys: int) -> bool:
        return max(self.target, self.source) < num_keys and layer_matches(self.layers, name)


@dataclass
class AttentionRecorder:
    """Keeps head-averaged cross-attention probabilities: ``maps[step][layer]`` is [rows, h, w, tokens]."""

    tokens: Sequence[int] | None = None
    layers: LayerFilter = None
    steps: Collection[int] | None = None
    rows: str = "cond"
    keep_grad: bool = False
    enabled: bool = True
    maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def active(self, name: str, step: int) -> bool:
        return self.enabled and layer_matches(self.layers, name) and (self.steps is None or step in self.steps)

    def add(self, step: int, name: str, probs: torch.Tensor) -> None:
        self.maps.setdefault(step, {})[name] = probs if self.keep_grad else probs.detach()

    def clear(self) -> None:
        self.maps.clear()

    def aggregate(self) -> torch.Tensor:
        """Mean over recorded layers and steps, each resized (bilinear) to the largest grid."""
        chosen = [m for layers in self.maps.values() for m in layers.values()]
        if not chosen:
            raise ValueError("No attention maps were recorded for the requested steps.")
        size = max((m.shape[1], m.shape[2]) for m in chosen)
        resized = []
        for m in chosen:
            if (m.shape[1], m.shape[2]) != tuple(size):
                m = F.interpolate(m.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            resized.append(m.float())
        return torch.stack(resized).mean(0)


@dataclass
class AppliedBias:
    """One bias applied at one call: what tests and the stats panel read back."""

    step: int
    timestep: float | None
    layer: str
    label: str
    tokens: tuple[int, ...]
    queries: int


class AttentionControl:
    """Per-run state and controls for a UNet's cross-attention; a context manager that installs processors."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.layers = cross_attention_layers(unet)
        self.biases: list[KeyBias] = []
        self.key_shares: list[KeyShare] = []
        self.recorders: list[AttentionRecorder] = []
        self.applied: list[AppliedBias] = []
        self.step = 0
        self.timestep: float | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.cfg = True
        self.static: Any = None  # fast.StaticBiases while a FastUNet call runs: biases from static gates and masks
        self._saved: dict[str, Any] | None = None
        self._hook = None

    def record(self, tokens: Sequence[int] | None = None, layers: LayerFilter = None,
               steps: Collection[int] | None = None, keep_grad: bool = False) -> AttentionRecorder:
        recorder = AttentionRecorder(tokens=tokens, layers=layers, steps=steps, keep_grad=keep_grad)
        self.recorders.append(recorder)
        return recorder

    def controlled_layers(self) -> list[str]:
        return [name for name in self.layers
                if any(layer_matches(b.layers, name) for b in self.biases)
                or any(layer_matches(s.layers, name) for s in self.key_shares)
                or any(layer_matches(r.layers, name) for r in self.recorders)]

    @property
    def enabled(self) -> bool:
        return bool(self.biases or self.key_shares or self.recorders)

    @property
    def installed(self) -> bool:
        """Whether controlled processors are on the UNet now (``install`` puts none when no control is set)."""
        return self._saved is not None

    def install(self) -> None:
        """Swap in controlled processors on the layers some control touches; the rest keep theirs."""
        if self._saved is not None or not self.enabled:
            return
        saved = dict(self.unet.attn_processors)
        processors = dict(saved)
        for name in self.controlled_layers():
            key = f"{name}.processor"
            processors[key] = ControlledAttnProcessor(self, name, saved[key])
        self.unet.set_attn_processor(processors)
        self._saved = saved
        self._hook = self.unet.register_forward_pre_hook(self._track_timestep, with_kwargs=True)

    def remove(self) -> None:
        if self._saved is None:
            return
        self.unet.set_attn_processor(self._saved)
        self._saved = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "AttentionControl":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @capture_safe("attention: latent size and timestep")  # host reads only outside a capture (FastUNet sets them)
    def _track_timestep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self.static is not None:  # the fast path set the timestep from the host-side schedule (no device sync)
            return
        self.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)

    def recording(self) -> bool:
        """Whether some recorder records some layer at this step (the fast path runs such steps eagerly)."""
        return any(r.active(name, self.step) for r in self.recorders for name in self.layers)

    @contextmanager
    def static_biases(self, static: Any) -> Iterator[None]:
        """While in here the controlled processors take their biases from ``static`` (a ``fast.StaticBiases``)
        instead of ``build_bias``, and the timestep from the fast path instead of the UNet call."""
        saved, self.static = self.static, static
        try:
            yield
        finally:
            self.static = saved

    def step_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` that advances the step counter (chain it if you need the tensors)."""
        self.step = step + 1
        return {}

    @contextmanager
    def scope(self, recorders: list[AttentionRecorder] | None = None, biases: list[KeyBias] | None = None,
              cfg: bool | None = None) -> Iterator[None]:
        """Temporarily other recorders/biases/CFG layout, for extra UNet calls inside a step (refinement on
        the positive prompt alone has no unconditional half; an anchor prompt has other token positions)."""
        saved = (self.recorders, self.biases, self.cfg)
        self.recorders = saved[0] if recorders is None else recorders
        self.biases = saved[1] if biases is None else biases
        self.cfg = saved[2] if cfg is None else cfg
        try:
            yield
        finally:
            self.recorders, self.biases, self.cfg = saved

    def row_slice(self, rows: str | slice, batch: int) -> slice:
        if isinstance(rows, slice):
            return rows
        if rows == "cond" and self.cfg and batch % 2 == 0:
            return slice(batch // 2, batch)
        return slice(0, batch)

    def region_mask(self, region: torch.Tensor, num_queries: int) -> torch.Tensor:
        """``region`` on this layer's grid: the cells whose centre it covers. Where that would cover every cell
        although the region leaves part of the image free (a box smaller than a cell of a coarse grid), only the
        cells it covers entirely, so the free part keeps at least the cells it touches."""
        h, w = query_grid(num_queries, self.latent_hw or (int(math.isqrt(num_queries)),) * 2)
        region = region[None, None].float()
        inside = F.interpolate(region, size=(h, w), mode="nearest-exact") > 0.5
        if inside.all() and not (region > 0.5).all():
            inside = -F.adaptive_max_pool2d(-region, (h, w)) > 0.5
        return inside.flatten()

    def share_keys(self, name: str, key: torch.Tensor) -> torch.Tensor:
        """``key`` ([batch, keys, dim]) with this layer's key shares added: one masked add of the shifted key per
        source-to-target distance, so a batch with a share per row (a training batch of different prompts) costs
        small fills of a [batch, keys] mask, not one autograd copy of the whole key per row in the backward. On the
        fast path the counts come from ``static`` (built once per cache entry, not in every captured call)."""
        counter = self.static if self.static is not None else self
        for offset, count in counter.share_counts(name, *key.shape[:2], key.device, key.dtype).items():
            key = key + count * key.roll(-offset, dims=1)
        return key

    def share_counts(self, name: str, batch: int, num_keys: int, device: torch.device,
                     dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Per source-to-target distance of this layer's key shares, how often each ``[batch, keys, 1]`` key
        gains the key that far along."""
        counts: dict[int, torch.Tensor] = {}
        for share in self.key_shares:
            if not share.active(name, num_keys):
                continue
            offset = share.source - share.target
            if offset not in counts:
                counts[offset] = torch.zeros(batch, num_keys, 1, dtype=dtype, device=device)
            counts[offset][self.row_slice(share.rows, batch), share.target] += 1
        return counts

    def build_bias(self, name: str, batch: int, num_queries: int, num_keys: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor | None:
        active = [b for b in self.biases if b.active(name, self.step, self.timestep)]
        if not active:
            return None
        bias = torch.zeros(batch, 1, num_queries, num_keys, device=device, dtype=dtype)
        for item in active:
            tokens = [t for t in item.tokens if t < num_keys]
            if not tokens:
                continue
            queries = (self.region_mask(item.region, num_queries).to(device) if item.region is not None
                       else torch.ones(num_queries, dtype=torch.bool, device=device))
            keys = torch.zeros(num_keys, dtype=torch.bool, device=device)
            keys[tokens] = True
            cells = queries[:, None] & keys[None, :]
            bias[self.row_slice(item.rows, batch), 0] += torch.where(cells, item.value, 0.0).to(dtype)
            self.applied.append(AppliedBias(self.step, self.timestep, name, item.label, tuple(tokens),
                                            int(queries.sum())))
        return bias


class ControlledAttnProcessor:
    """Cross-attention with optional key bias and probability recording; defers to ``fallback`` when idle."""

    def __init__(self, control: AttentionControl, name: str, fallback: Any) -> None:
        self.control = control
        self.name = name
        self.fallback = fallback

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        control = self.control
        recorders = [r for r in control.recorders if r.active(self.name, control.step)]
        static = control.static
        bias_active = (static.covers(self.name) if static is not None
                       else any(b.active(self.name, control.step, control.timestep) for b in control.biases))
        sharing = any(s.active(self.name, encoder_hidden_states.shape[1]) for s in control.key_shares
                      ) if encoder_hidden_states is not None else False
        if encoder_hidden_states is None or hidden_states.ndim != 3 or not (recorders or bias_active or sharing):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        batch, num_queries, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = control.share_keys(self.name, attn.to_k(encoder_hidden_states))
        value = attn.to_v(encoder_hidden_states)
        num_keys = key.shape[1]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        build = static.bias if static is not None else control.build_bias
        bias = build(self.name, batch, num_queries, num_keys, query.device, query.dtype)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, num_keys, batch).view(batch, attn.heads, -1, num_keys)
            bias = mask if bias is None else bias + mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        if recorders:
            # Probabilities are computed beside SDPA, not instead of it: recording never changes the image.
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            probs = (scores if bias is None else scores + bias).softmax(dim=-1).mean(dim=1)
            h, w = query_grid(num_queries, control.latent_hw or (int(math.isqrt(num_queries)),) * 2)
            for recorder in recorders:
                rows = probs[control.row_slice(recorder.rows, batch)]
                selected = rows if recorder.tokens is None else rows[..., list(recorder.tokens)]
                recorder.add(control.step, self.name, selected.reshape(selected.shape[0], h, w, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
