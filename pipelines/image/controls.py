"""The control plan: the token controls a request asks for, read and validated once, applied by the image tab to
its prompt and by the video tab to each shot's prompt.

Defaults come from each technique's config dataclass (``LPAConfig``, ``BindingConfig``); the requests only
carry what a user changed. What differs between the tabs is where a control acts (an image's rows, a shot's
frames), not how it is set up: a prompt that does not name an isolated item is an error for an image and a
shot that does not need it for a video; a prompt without a style is an error for an image and a skipped shot for
a video.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..base import PipelineError
from .attention import AttentionControl
from .binding import BindingConfig, GroupTokens
from .leakfix import isolate_items
from .lpa import LPAConfig, route_style_tokens
from .prompts import ParsedPrompt, content_words, find_words, span_positions, token_positions


def split_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def check_window(window: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in window)
    if not 0 <= low <= high <= 1000:
        raise PipelineError(f"LPA window must satisfy 0 <= start <= end <= 1000, got {tuple(window)}.")
    return low, high


def binding_report(groups: list[GroupTokens]) -> list[dict[str, Any]]:
    """What the output's metadata says about each bound group."""
    return [{"phrase": g.phrase, "nouns": g.nouns, "attributes": g.attributes} for g in groups]


@dataclass(frozen=True)
class ControlPlan:
    binding: BindingConfig | None = None  # ToMe semantic binding; None = off
    lpa: LPAConfig | None = None  # Local Prompt Adaptation; None = off
    isolate: tuple[str, ...] = ()  # Follow-the-Flow leakage fix: items re-encoded alone

    @classmethod
    def from_request(cls, request: Any) -> "ControlPlan":
        """From an ``ImageRequest`` or a ``VideoRequest`` (fields ``binding``, ``lpa``, ``lpa_window``,
        ``isolate``, and ``ets_step`` where the tab has it)."""
        window = check_window(request.lpa_window)
        binding = None
        if request.binding:
            binding = BindingConfig()
            binding = replace(binding, ets_step=int(getattr(request, "ets_step", binding.ets_step)))
        return cls(binding=binding, lpa=LPAConfig(window=window) if request.lpa else None,
                   isolate=tuple(split_words(request.isolate)))

    @property
    def active(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate)

    def isolated(self, pipe: Any, text: str, positive: torch.Tensor, strict: bool = True
                 ) -> tuple[torch.Tensor, dict[str, list[int]] | None]:
        """``positive`` with the isolated items that ``text`` names re-encoded alone, and where they are (None when
        none applies). ``strict``: an item missing from ``text`` is an error."""
        items = list(self.isolate) if strict else [i for i in self.isolate if find_words(text, i) is not None]
        if not items:
            return positive, None
        return isolate_items(pipe, text, items, positive)

    def route_lpa(self, control: AttentionControl, tokenizer: Any, parsed: ParsedPrompt,
                  rows: slice | None = None) -> dict[str, Any] | None:
        """LPA's biases for ``parsed``'s content and style tokens on ``control`` (on batch ``rows`` if given, else
        the conditional half); the report, or None when the prompt has no style to route."""
        if self.lpa is None or parsed.style is None:
            return None
        content = span_positions(tokenizer, parsed.text, content_words(parsed))
        style = token_positions(tokenizer, parsed.text, parsed.style.start, parsed.style.end)
        for bias in route_style_tokens(control.layers, content, style, self.lpa):
            if rows is not None:
                bias.rows = rows
            control.biases.append(bias)
        return {"content_tokens": content, "style_tokens": style, "style": parsed.style.text}
