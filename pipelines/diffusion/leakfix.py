"""Leakage fix from "Follow the Flow" (Kaplan et al., arXiv 2504.01137): information leaks across items in
CLIP's causal text encoder ("a pool by a table" -> a pool table). Encoding the leaked item alone gives its
uncontextualised vectors; patching them into the prompt's embedding at the item's positions removes the leak.
Pure ``prompt_embeds`` surgery: one extra text-encoder pass per item, any SD-family pipeline.

Served refinement (ours, measured): the item is encoded alone but at the positions it has in the prompt
(``encoded_at_place``), not at 1..n as a prompt of its own (``encoded_alone``, the paper's). On micro-world v2, CPU,
96 swapped-colour units through the served path, it cut leakage 0.52 -> 0.41 (95 % CI of the change [-0.18, -0.04])
and raised binding 0.36 -> 0.47 ([0.06, 0.18]), where the paper's placement changed neither (-0.04, +0.01, CIs
include zero); on v3 the paper's placement lost the second object (found 0.85 -> 0.66) and this one kept it
(benchmarks/results/leakfix_ablation_v2_atplace_cpu96.json, leakfix_ablation_v3_atplace_cpu96.json)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..base import PipelineError
from .prompts import Span, encode_positive, find_words, token_positions

# (pipe, prompt text, the item's span in it, its token positions there, batch) -> the item's states [batch, n, dim]
ItemEncoder = Callable[[Any, str, Span, list[int], int], torch.Tensor]


def encoded_alone(pipe: Any, text: str, span: Span, positions: list[int], batch: int) -> torch.Tensor:
    """The paper's uncontextualised vectors: the item encoded as a prompt of its own."""
    if len(pipe.tokenizer(span.text, add_special_tokens=False)["input_ids"]) != len(positions):
        raise PipelineError(f"Leakage fix: '{span.text}' tokenizes differently alone than in the prompt.")
    return encode_positive(pipe, span.text, batch)[:, 1:1 + len(positions)]


def encoded_at_place(pipe: Any, text: str, span: Span, positions: list[int], batch: int) -> torch.Tensor:
    """The item encoded alone (its start token and words, nothing before them) but at the positions it has in the
    prompt. Alone, every item sits at positions 1..n, as if it were the first thing named; here only the earlier
    words are gone. The layer is the one the pipeline reads: the last state (SD1.5), each encoder's penultimate
    state side by side (SDXL)."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    states = []
    for tokenizer, encoder in encoders:
        ids = tokenizer(span.text)["input_ids"][:-1]  # no end token: a causal encoder's words never read it
        if len(ids) - 1 != len(positions):
            raise PipelineError(f"Leakage fix: '{span.text}' tokenizes differently alone than in the prompt.")
        out = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=len(encoders) > 1,
                      position_ids=torch.tensor([[0] + positions], device=encoder.device))
        states.append(out.hidden_states[-2] if len(encoders) > 1 else out[0])
    return torch.cat(states, dim=-1)[:, 1:].expand(batch, -1, -1)


def isolate_items(pipe: Any, text: str, items: list[str], positive: torch.Tensor,
                  encode_item: ItemEncoder = encoded_at_place) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Replace each item's token vectors in ``positive`` [batch, tokens, dim] by ``encode_item``'s (the item
    encoded alone at its own positions unless told otherwise)."""
    patched = positive.clone()
    where: dict[str, list[int]] = {}
    for item in items:
        span = find_words(text, item)
        if span is None:
            raise PipelineError(f"Leakage fix: '{item}' does not occur in the prompt. Name words that appear in it.")
        positions = token_positions(pipe.tokenizer, text, span.start, span.end)
        patched[:, positions] = encode_item(pipe, text, span, positions, positive.shape[0]).to(positive.dtype)
        where[span.text] = positions
    return patched, where
