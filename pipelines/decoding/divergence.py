"""Where a drafted run left plain decoding, and whether rounding explains it.

Outside exact mode a drafted run is identical to plain decoding in fp32 on the CPU, but in bf16 (what the GPU
serves) a tree forward moves each logit in its last bits, so where the two best tokens are nearly tied the
runs can choose differently. Each run keeps its two best logits per committed token
(``DecodeStats.keep_top``); comparing them at the first differing token tells a near-tie flip from a real
difference (a sampling draw, or a bug).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# bf16 keeps 8 significant bits (a relative step of 2^-8..2^-7); a gap within ~5 such steps is what reordered
# reductions over a few layers move, far below the gaps of real (non-tied) choices
NEAR_TIE_RELATIVE = 0.02

TopTwo = list[tuple[int, float]]  # [(id, logit), (id, logit)], largest first


@dataclass(frozen=True)
class Divergence:
    """The first token where the runs differ: each run's choice and its logit, and each run's logit for the
    other run's choice; a logit is None where that token was not among the run's two best (a sampled or
    penalised choice)."""

    index: int
    plain_token: int
    plain_logit: float | None
    method_token: int
    method_logit: float | None
    plain_logit_of_method_token: float | None
    method_logit_of_plain_token: float | None

    @property
    def near_tie(self) -> bool:
        """Both runs ranked the two tokens first and second, with gaps within bf16 rounding."""
        gaps = (_gap(self.plain_logit, self.plain_logit_of_method_token),
                _gap(self.method_logit, self.method_logit_of_plain_token))
        return all(gap is not None and gap <= NEAR_TIE_RELATIVE for gap in gaps)

    def as_dict(self) -> dict:
        return {**asdict(self), "near_tie": self.near_tie}


def _gap(best: float | None, other: float | None) -> float | None:
    return None if best is None or other is None else abs(best - other) / max(abs(best), 1.0)


def _logit_of(top: TopTwo, token: int) -> float | None:
    return next((logit for candidate, logit in top if candidate == token), None)


def first_divergence(plain_ids: list[int], method_ids: list[int], plain_top: list[TopTwo],
                     method_top: list[TopTwo]) -> Divergence | None:
    """The first position where both runs produced a token and the tokens differ (None when there is none);
    ``*_top`` are the runs' ``DecodeStats.top_two()``, one entry per committed token."""
    index = next((i for i, (a, b) in enumerate(zip(plain_ids, method_ids)) if a != b), None)
    if index is None or index >= min(len(plain_top), len(method_top)):
        return None
    plain, method = plain_ids[index], method_ids[index]
    return Divergence(
        index=index,
        plain_token=plain,
        plain_logit=_logit_of(plain_top[index], plain),
        method_token=method,
        method_logit=_logit_of(method_top[index], method),
        plain_logit_of_method_token=_logit_of(plain_top[index], method),
        method_logit_of_plain_token=_logit_of(method_top[index], plain),
    )
