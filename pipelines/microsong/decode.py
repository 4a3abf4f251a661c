"""Decoding a tune's body with the project's lossless decoding core: plain decoding (``plain.plain_decode``) or
prompt lookup verified as a token tree (``verify.speculative_decode`` with ``PromptLookup``), the structure guard
as the logits processor of both. Songs repeat (a chorus recurs note for note, verses share a melody), so a lookup
of the trailing n-gram drafts whole recurring phrases and one forward commits several tokens."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..base import CancelToken
from ..decoding.drafters.prompt_lookup import PromptLookup
from ..decoding.plain import DecodeStats, SamplingConfig, plain_decode
from ..decoding.verify import speculative_decode
from .guard import StructureGuard
from .model import NoteModel
from .tunes import Plan

# Drafting: a phrase is ~20-40 tokens; 16 drafted tokens per forward, matched on up to 6-token n-grams (the body's
# 2- and 3-grams, "D2 N7 D2", recur everywhere and point at the wrong place).
LOOKUP_TOKENS, LOOKUP_NGRAM = 16, 6


def max_body_tokens(plan: Plan) -> int:
    """A generous cap on the body's length: a guarded body ends well inside it (a 4-bar phrase of 16 notes is ~45
    tokens), a random-weight model that never ends stops here."""
    lines = sum(len(counts) for _, counts in plan.sections)
    return 16 + 8 * len(plan.sections) + sum(3 * n + 24 for _, counts in plan.sections for n in counts) + 4 * lines


@contextmanager
def cpu_threads(model, threads: int = 1) -> Iterator[None]:
    """Run a CPU model's forwards on ``threads`` intra-op threads, then restore the setting. A 1.2 M-parameter
    model's matmuls are too small to split: on a busy 2-core machine one thread decoded a 159-token body in 0.27 s,
    two threads (torch's default here) in 1.8-5.8 s (OpenMP threads waiting on each other). Requests run one at a
    time (the app's single GPU lane), so no other model's forward sees the change."""
    if model.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_body(note: NoteModel, plan: Plan, sampling: SamplingConfig, draft: bool, guard: bool = True,
                cancel: CancelToken | None = None, stats: DecodeStats | None = None) -> Iterator[list[str]]:
    """The body's tokens as the decoder commits them (one per forward plainly, a run per forward drafted)."""
    tokenizer, model = note.tokenizer, note.model
    prompt = torch.tensor([tokenizer.convert_tokens_to_ids(plan.prompt_tokens())], device=model.device)
    processors = StructureGuard(plan) if guard else None
    eos = {tokenizer.eos_token_id}
    limit = max_body_tokens(plan)
    if draft:
        runs = speculative_decode(model, prompt, limit, sampling, eos, PromptLookup(LOOKUP_TOKENS, LOOKUP_NGRAM),
                                  cancel, stats, processors=processors)
    else:
        runs = plain_decode(model, prompt, limit, sampling, eos, cancel, stats, processors=processors)
    with cpu_threads(model):
        for run in runs:
            yield tokenizer.convert_ids_to_tokens(run)
