"""Lossless chain draft-and-verify for token-autoregressive audio stages (Bark's semantic and coarse models).

Bark's attention applies its own causal mask (``BarkSelfAttention.bias``, bottom-right aligned) and has no
position-id or 4D-mask contract for trees, so the draft is a single chain: one forward over ``[root, d1..dk]``
needs only the causal mask, and a rejected tail is dropped with ``DynamicCache.crop``. Drafts come from any
core drafter cut to its first chain, typically ``decoding.prompt_lookup.PromptLookup`` over the token history
(audio tokens repeat in silences, held vowels and the coarse history Bark feeds back into every window).
Acceptance is the verifier recipe of the decoding core: greedy = longest
matching prefix plus the bonus token; sampling = sample at each position with one generator and continue while
the sample equals the draft, which draws exactly the samples plain decoding draws, so ids are identical.

Unlike ``decoding.verify.speculative_decode`` this loop also takes a prefill given as ``inputs_embeds``
(Bark's semantic prompt is a sum of text and history embeddings) and per-position ``LogitsProcessor``s (Bark
suppresses tokens and alternates codebooks by position), applied at every verified position exactly as plain
decoding applies them.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList

from .base import CancelToken
from .decoding.plain import DecodeStats, SamplingConfig, choose_token
from .decoding.tree import TokenTree
from .decoding.verify import Drafter


def _processed(processors: LogitsProcessorList | None, prefix_len: int, tokens: list[int],
               logits: torch.Tensor) -> torch.Tensor:
    """Logits for the position after ``tokens``, through the processors that plain decoding would apply there."""
    if not processors:
        return logits
    ids = torch.zeros((1, prefix_len + len(tokens)), dtype=torch.long, device=logits.device)
    if tokens:
        ids[0, prefix_len:] = torch.tensor(tokens, device=logits.device)
    return processors(ids, logits[None].float())[0]


@torch.inference_mode()
def chain_decode(
    model,
    prompt: dict[str, torch.Tensor],
    max_new_tokens: int,
    config: SamplingConfig,
    eos_ids: set[int],
    *,
    processors: LogitsProcessorList | None = None,
    drafter: Drafter | None = None,
    history: Sequence[int] = (),
    generator: torch.Generator | None = None,
    cancel: CancelToken | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[list[int]]:
    """Yield the tokens committed by each forward until EOS or ``max_new_tokens``; no drafter = plain decoding.

    ``prompt`` is ``{"input_ids": ...}`` or ``{"inputs_embeds": ...}`` (batch 1). Processors see a sequence of the
    prompt's length followed by the generated ids, as in ``generate``. ``history`` (e.g. the prompt's own tokens)
    is searched by the drafter together with the generated ids.
    """
    stats = stats if stats is not None else DecodeStats()
    prefix_len = next(iter(prompt.values())).shape[1]
    cache = DynamicCache(config=model.config)
    out = model(**prompt, past_key_values=cache, use_cache=True)
    stats.forwards += 1
    tokens = [choose_token(_processed(processors, prefix_len, [], out.logits[0, -1]), config, generator)]
    stats.new_tokens += 1
    stats.accepted_per_forward.append(1)
    yield list(tokens)
    context = [*history, *tokens]
    if drafter is not None:
        drafter.start(list(context))
    try:
        yield from _verify_steps(model, cache, tokens, context, max_new_tokens, config, eos_ids, processors,
                                 drafter, prefix_len, generator, cancel, stats)
    finally:
        if drafter is not None:
            drafter.finish()


def _verify_steps(model, cache, tokens: list[int], context: list[int], max_new_tokens: int, config: SamplingConfig,
                  eos_ids: set[int], processors, drafter: Drafter | None, prefix_len: int,
                  generator: torch.Generator | None, cancel: CancelToken | None,
                  stats: DecodeStats) -> Iterator[list[int]]:
    device = next(model.parameters()).device
    while tokens[-1] not in eos_ids and len(tokens) < max_new_tokens:
        if cancel is not None:
            cancel.raise_if_cancelled()
        remaining = max_new_tokens - len(tokens)
        tree = TokenTree.chain(tokens[-1], [])
        if drafter is not None:
            tree = drafter.propose(context).truncated(max_depth=remaining - 1).first_chain()
        draft = tree.tokens[1:]
        step = torch.tensor([tree.tokens], device=device)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0]
        stats.forwards += 1
        accepted: list[int] = []
        for position in range(len(draft) + 1):
            token = choose_token(_processed(processors, prefix_len, tokens + accepted, logits[position]), config,
                                 generator)
            accepted.append(token)
            if position == len(draft) or token != draft[position] or token in eos_ids:
                break
        rejected = len(draft) + 1 - len(accepted)
        if rejected:
            cache.crop(-rejected)
        tokens.extend(accepted)
        context.extend(accepted)
        if drafter is not None:
            drafter.update(tree, logits, accepted)
        stats.new_tokens += len(accepted)
        stats.accepted_per_forward.append(len(accepted))
        yield accepted
