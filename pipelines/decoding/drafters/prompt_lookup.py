"""Prompt lookup decoding (Saxena 2023; transformers' ``prompt_lookup_num_tokens``): find the latest earlier
occurrence of the context's trailing n-gram and draft the tokens that followed it, as one chain.

An index of every n-gram's latest end position is kept up to date as tokens are committed, so a lookup is a
dict access instead of a scan of the whole context.
"""
from __future__ import annotations

import torch

from ..tree import TokenTree
from ..verify import Drafter


MAX_AGREED = 16


class PromptLookup(Drafter):
    # transformers' defaults: 10 draft tokens, n-grams of size 2 down to 1; a 3-gram first is more precise.
    def __init__(self, num_tokens: int = 10, max_ngram: int = 3) -> None:
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.context: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}

    def start(self, prompt: list[int]) -> None:
        self.context, self.latest = [], {}
        self._extend(prompt[:-1])
        self.context.append(prompt[-1])

    def _extend(self, tokens: list[int]) -> None:
        """Index the n-grams ending at each new token (the newest token is indexed one step later, so a
        lookup never finds the trailing n-gram itself)."""
        for token in tokens:
            self.context.append(token)
            end = len(self.context)
            for n in range(1, min(self.max_ngram, end) + 1):
                self.latest[tuple(self.context[end - n:end])] = end

    def matches(self, context: list[int]) -> list[tuple[int, list[int], int]]:
        """``(n, continuation, agreed)`` after the latest occurrence of the trailing n-gram, longest n first
        (one per n that matches; different n often point at different earlier spots). ``agreed`` is how many
        trailing tokens (up to ``MAX_AGREED``) equal the ones before that spot: long in a copied passage."""
        found = []
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            end = self.latest.get(tuple(context[-n:]))
            if end is not None:
                agreed = n
                while agreed < min(MAX_AGREED, end) and context[end - 1 - agreed] == context[-1 - agreed]:
                    agreed += 1
                found.append((n, context[end:end + self.num_tokens], agreed))
        return found

    def propose(self, context: list[int]) -> TokenTree:
        found = self.matches(context)
        return TokenTree.chain(context[-1], found[0][1]) if found else TokenTree([context[-1]], [-1])

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.commit(accepted)

    def commit(self, tokens: list[int]) -> None:
        """Append committed ``tokens`` to the indexed context."""
        last = self.context.pop()
        self._extend([last, *tokens[:-1]])
        self.context.append(tokens[-1])
