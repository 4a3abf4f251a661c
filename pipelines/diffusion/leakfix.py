"""Leakage fix from "Follow the Flow" (Kaplan et al., arXiv 2504.01137): information leaks across items in
CLIP's causal text encoder ("a pool by a table" -> a pool table). Encoding the leaked item alone gives its
uncontextualised vectors; patching them into the prompt's embedding at the item's positions removes the leak.
Pure ``prompt_embeds`` surgery: one extra text-encoder pass per item, any SD-family pipeline."""
from __future__ import annotations

from typing import Any

import torch

from ..base import PipelineError
from .prompts import encode_positive, find_words, token_positions


def isolate_items(pipe: Any, text: str, items: list[str],
                  positive: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Replace each item's token vectors in ``positive`` [batch, tokens, dim] by those of the item encoded alone."""
    tokenizer = pipe.tokenizer
    patched = positive.clone()
    where: dict[str, list[int]] = {}
    for item in items:
        span = find_words(text, item)
        if span is None:
            raise PipelineError(f"Leakage fix: '{item}' does not occur in the prompt. Name words that appear in it.")
        positions = token_positions(tokenizer, text, span.start, span.end)
        alone_ids = tokenizer(span.text, add_special_tokens=False)["input_ids"]
        if len(alone_ids) != len(positions):
            raise PipelineError(f"Leakage fix: '{item}' tokenizes differently alone than in the prompt.")
        alone = encode_positive(pipe, span.text, positive.shape[0]).to(positive.dtype)
        patched[:, positions] = alone[:, 1:1 + len(positions)]
        where[span.text] = positions
    return patched, where
