"""Leakage fix from "Follow the Flow" (Kaplan et al., arXiv 2504.01137): information leaks across items in
CLIP's causal text encoder ("a pool by a table" -> a pool table). Encoding the leaked item alone gives its
uncontextualised vectors; patching them into the prompt's embedding at the item's positions removes the leak.
Pure ``prompt_embeds`` surgery: one extra text-encoder pass per item, any SD-family pipeline."""
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


def isolate_items(pipe: Any, text: str, items: list[str], positive: torch.Tensor,
                  encode_item: ItemEncoder = encoded_alone) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Replace each item's token vectors in ``positive`` [batch, tokens, dim] by ``encode_item``'s (the item
    encoded alone unless told otherwise)."""
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
