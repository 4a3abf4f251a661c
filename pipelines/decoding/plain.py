"""Plain autoregressive decoding: the baseline every multi-token method must reproduce exactly, and what the
verifier shares with it (sampling, the processed logits, the step statistics)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..base import CancelToken


@dataclass
class SamplingConfig:
    """Greedy when temperature is 0; else temperature, top-k (0 = off) and nucleus (top-p) sampling with
    ``seed``, applied in ``generate``'s order."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class DecodeStats:
    new_tokens: int = 0
    forwards: int = 0
    accepted_per_forward: list[int] = field(default_factory=list)
    draft_s: float = 0.0  # time spent building trees and updating drafter state
    step_s: float = 0.0  # time spent in whole steps (forward, acceptance, drafting)
    top_logits: list[tuple[torch.Tensor, torch.Tensor, list[int]]] | None = None  # [] keeps them: ``keep_top``

    def count_forward(self, committed: int) -> None:
        """One forward that committed ``committed`` tokens."""
        self.forwards += 1
        self.new_tokens += committed
        self.accepted_per_forward.append(committed)

    def keep_top(self, logits: torch.Tensor, rows: list[int] | None = None) -> None:
        """With ``top_logits`` on, keep the two largest raw logits and their ids of the ``rows`` of ``logits``
        (all when None) the committed tokens were chosen at: what explains a divergence afterwards. Only the rows up
        to the last one asked for are ranked (a slice: ranking every verified row cost ~3.6 ms a step of a CPU's
        86-node trees, and indexing the rows would copy their indices to the device); their top-2 stays on the
        device, so a step adds no transfer; ``top_two`` picks the rows."""
        if self.top_logits is not None:
            top = (logits if rows is None else logits[:max(rows) + 1]).float().topk(2, dim=-1)
            self.top_logits.append((top.values, top.indices, list(range(len(logits))) if rows is None else rows))

    def top_two(self) -> list[list[tuple[int, float]]]:
        """Per committed token, ``[(id, logit), (id, logit)]`` (largest first), read back in one transfer."""
        if not self.top_logits:
            return []
        values = torch.cat([v for v, _, _ in self.top_logits]).tolist()
        ids = torch.cat([i for _, i, _ in self.top_logits]).tolist()
        chosen, offset = [], 0
        for step_values, _, rows in self.top_logits:
            chosen.extend(offset + row for row in rows)
            offset += len(step_values)
        return [list(zip(ids[row], values[row])) for row in chosen]

    @property
    def tau(self) -> float:
        """Mean tokens committed per forward (1.0 for plain decoding)."""
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def draft_share(self) -> float:
        """Fraction of step time spent drafting."""
        return self.draft_s / self.step_s if self.step_s else 0.0


def accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def process_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, then top-p on a [..., vocab] float tensor; returns log-probabilities."""
    logits = logits.float() / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.log_softmax(-1)


def choose_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """The next token from one position's logits: argmax, or a sample drawn with ``generator``."""
    if config.greedy:
        return int(logits.argmax(-1))
    probs = process_logits(logits, config).exp()
    return int(torch.multinomial(probs, 1, generator=generator))


def logits_processing(processors, prompt: torch.Tensor,
                      generated: list[int]) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """A node's logits rewritten by a transformers ``LogitsProcessorList``: the processors see the prompt ids
    ``prompt`` (1-D), the generated ids, then ``path`` (the tokens accepted on the way to the node), as in
    ``generate`` (repetition penalty reads the prompt)."""

    def process(logits: torch.Tensor, path: list[int]) -> torch.Tensor:
        tokens = torch.tensor(generated + path, dtype=torch.long, device=logits.device)
        ids = torch.cat([prompt.to(logits.device), tokens])[None]
        return processors(ids, logits[None].float())[0]

    return process


def make_generator(config: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if config.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator


def plain_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    config: SamplingConfig,
    eos_ids: set[int],
    cancel: CancelToken | None = None,
    stats: DecodeStats | None = None,
    forward=None,
    processors=None,
) -> Iterator[list[int]]:
    """Yield one new token at a time (as a one-element list) until EOS or ``max_new_tokens``: the verifier's own
    loop with ``verify.NoDraft``, so the baseline and every drafted method run the same code. With a ``forward``
    adapter (``verify.CausalLMForward`` or a subclass such as ``static.StaticForward``) each step goes through it;
    without one, through ``verify.StockForward`` (the model's own cache and causal mask). ``processors`` (a
    ``LogitsProcessorList``, e.g. repetition penalty) rewrite each step's logits before the choice, as in
    ``generate``."""
    from .verify import NoDraft, StockForward, speculative_decode  # verify builds on this module's types

    return speculative_decode(model, input_ids, max_new_tokens, config, eos_ids, NoDraft(), cancel, stats,
                              forward if forward is not None else StockForward(model), processors=processors)
