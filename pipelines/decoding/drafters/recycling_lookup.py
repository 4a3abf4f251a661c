"""Token Recycling's template tree with a prompt-lookup chain beside it under the root: the two drafters whose drafting
is cheap enough to run on the device (``device_loop``), in one tree. Recycling guesses the next few tokens of free text
from what the model predicted after each token before; prompt lookup copies a longer run where the answer repeats the
prompt or itself (code, quotes, lists), which a depth-6 template cannot reach.

This is the host form: on a GPU's static step greedy requests run the same tree on the device
(``device_loop.RecyclingLoop`` with ``lookup``); here, for sampling, logits processors and other forwards.
"""
from __future__ import annotations

import torch

from ..tree import TokenTree
from ..verify import Drafter
from .prompt_lookup import PromptLookup
from .recycling import TokenRecycling

LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens


def with_chain(parents: list[int], length: int) -> list[int]:
    """``parents`` of a tree, then those of a chain of ``length`` nodes appended below its root."""
    size = len(parents)
    return parents + ([0] + list(range(size, size + length - 1)) if length else [])


class RecyclingLookup(Drafter):
    """``recycler``'s template (at its active size) plus, under the root, the tokens that followed the latest earlier
    occurrence of the context's trailing 3-, 2- or 1-gram (at most ``lookup`` of them)."""

    def __init__(self, recycler: TokenRecycling, lookup: int = LOOKUP_TOKENS) -> None:
        self.recycler, self.lookup = recycler, lookup
        self.finder = PromptLookup(num_tokens=lookup)

    def start(self, prompt: list[int]) -> None:
        self.finder.start(prompt)

    def propose(self, context: list[int]) -> TokenTree:
        self.template = template = self.recycler.propose(context)
        found = self.finder.matches(context)
        chain = found[0][1] if found else []
        self.proposed = TokenTree(template.tokens + chain, with_chain(template.parents, len(chain)),
                                  template.depths + list(range(1, len(chain) + 1)))
        return self.proposed

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """Every verified node recycled; the template's acceptance counted where the tree was verified whole."""
        self.recycler.recycle(tree.tokens, logits)
        if len(tree) == len(self.proposed):
            self.recycler.count(self.template, accepted)
        self.finder.commit(accepted)
