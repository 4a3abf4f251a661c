"""Sliding-window attention (Gemma 2/3, Mistral, Qwen with ``use_sliding_window``) under tree verification.

transformers keeps a sliding layer's cache at its last ``window - 1`` rows (``DynamicSlidingWindowLayer``) and
builds each layer type's mask itself. Neither survives draft-and-verify: a trimmed layer cannot be cropped back
once the context passes the window, and a 4D mask handed to the model replaces every layer type's mask, so
sliding layers would attend past their window. Here every attention layer keeps full-length K/V (rollback stays
an ordinary crop, or a moved write position on the static cache) and the window is applied through the mask:
the model gets one mask per layer type, the sliding one being the tree mask AND transformers' own
``sliding_window_overlay``, with each key at its *logical* position (a tree node's is root + depth).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs
from transformers.masking_utils import sliding_window_overlay

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedAttention(ValueError):
    """The model has layers (chunked or linear attention, shared K/V) whose cache the verifier cannot roll back."""


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[q, kv]`` bool -> ``(1, 1, q, kv)`` float, 0 where visible and the dtype's minimum elsewhere. Float, not
    bool: eager attention *adds* the mask, so a bool mask is silently wrong there (reference §3.1, §9.1)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


@dataclass(frozen=True)
class AttentionLayout:
    """The attention type of each layer and the sliding layers' window (None without sliding layers)."""

    types: tuple[str, ...]
    window: int | None = None

    @property
    def sliding(self) -> bool:
        return SLIDING in self.types

    def masks(self, visible: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
        """The model's ``attention_mask`` for a ``[q, kv]`` visibility pattern: one additive mask when every layer
        is of one type, else one per type (the models with mixed layers take such a dict as is). Positions are
        the queries' and the keys' logical positions (1-D); only sliding layers read them."""
        if not self.sliding:
            return additive(visible, dtype)
        inside = sliding_window_overlay(self.window)(None, None, query_positions[:, None], key_positions[None, :])
        windowed = additive(visible & inside, dtype)
        if FULL not in self.types:
            return windowed
        return {FULL: additive(visible, dtype), SLIDING: windowed}

    def new_cache(self, config) -> DynamicCache:
        """transformers' cache for ``config`` with every sliding layer full-length (the mask applies the window)."""
        cache = DynamicCache(config=config)
        if self.sliding:
            cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                            for layer in cache.layers]
        return cache


def attention_layout(model) -> AttentionLayout:
    """The layout transformers' cache utilities read from the model's config; raises ``UnsupportedAttention`` for
    layer types whose cache cannot be rolled back by a crop (chunked or linear attention, shared K/V)."""
    config = model.config.get_text_config(decoder=True)
    types, options = get_layer_types_and_kwargs(config)
    others = sorted(set(types) - {FULL, SLIDING})
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    if others:
        raise UnsupportedAttention(
            f"{name} has {', '.join(others)} layers, whose cache the tree verifier cannot roll back.")
    windows = {option["sliding_window"] for kind, option in zip(types, options) if kind == SLIDING}
    if len(windows) > 1:
        raise UnsupportedAttention(f"{name} has sliding layers with different windows ({sorted(windows)}).")
    return AttentionLayout(tuple(types), windows.pop() if windows else None)
