"""The same-seed A/B report the Compare view shows: a method against vanilla decoding of the same request. Next to
``divergence`` because the question it answers is the same one, from the UI's side: is the method faster here, why
(τ against what one of its forwards costs), and did it reproduce vanilla's tokens, or where and why not."""
from __future__ import annotations

from typing import Any

from ..base import Result
from .divergence import first_divergence


def compare_stats(vanilla: Result, method: Result) -> dict[str, Any]:
    """The A/B summary the Compare view shows: both runs' speed and τ, the speed-up, what one forward cost in
    each (a method is slower where its forwards cost more than τ repays), and whether the method reproduced
    vanilla's tokens exactly."""
    base, fast = vanilla.stats, method.stats
    base_ms, fast_ms = _ms_per_forward(base), _ms_per_forward(fast)
    return {
        "method": fast["method"],
        "device": fast.get("device", ""),
        "vanilla_tokens_per_s": base["tokens_per_s"],
        "method_tokens_per_s": fast["tokens_per_s"],
        "speedup": round(fast["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else 0.0,
        "vanilla_forwards": base["forwards"],
        "method_forwards": fast["forwards"],
        "vanilla_ms_per_forward": base_ms,
        "method_ms_per_forward": fast_ms,
        "forward_cost_ratio": round(fast_ms / base_ms, 3) if base_ms else 0.0,
        "tau": fast["tau"],
        "draft_share": fast["draft_share"],
        "draft_head": fast.get("draft_head", False),
        "identical": vanilla.metadata["token_ids"] == method.metadata["token_ids"],
        "divergence": divergence_report(vanilla, method),
        "exact": fast.get("exact", False),
        "dtype": fast.get("dtype", ""),
        "seed": fast["seed"],
    }


def divergence_report(vanilla: Result, method: Result) -> dict[str, Any] | None:
    """``divergence.first_divergence`` of the two runs with the tokens' texts; None when no token differs."""
    plain, drafted = vanilla.metadata, method.metadata
    divergence = first_divergence(plain["token_ids"], drafted["token_ids"], plain.get("top_logits", []),
                                  drafted.get("top_logits", []))
    if divergence is None:
        return None
    index = divergence.index
    return {**divergence.as_dict(), "plain_text": plain["token_texts"][index],
            "method_text": drafted["token_texts"][index]}


def _ms_per_forward(stats: dict[str, Any]) -> float:
    return round(1000 * stats["time_s"] / stats["forwards"], 3) if stats["forwards"] else 0.0
