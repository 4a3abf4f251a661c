"""Draft-model speculation (Leviathan et al. 2023; Chen et al. 2023) with a smaller model of the same tokenizer.

The draft model decodes ``num_tokens`` greedy tokens as a chain; with ``siblings`` > 0 the runners-up at each
depth hang below the same parent as extra leaves (LLMCad-style token tree, free: they come from the logits
the chain already computed). The drafts are deterministic, so the verifier's "sample at the node, follow the
matching child" keeps sampling lossless too. The draft model keeps its own cache: rows for drafted tokens
that the target accepted stay, the rest are cropped.
"""
from __future__ import annotations

import torch

from ..tree import TokenTree
from ..verify import CausalLMForward, Drafter


class DraftModel(Drafter):
    def __init__(self, model, num_tokens: int = 5, siblings: int = 0) -> None:
        if num_tokens < 1:
            raise ValueError("A draft model must draft at least one token per step.")
        self.forward = CausalLMForward(model, tree_attention=False)
        self.num_tokens = num_tokens
        self.siblings = siblings
        self.cache = None
        self.cached = 0  # context tokens whose rows are in the draft cache
        self.chain: list[int] = []

    def start(self, prompt: list[int]) -> None:
        self.cache = self.forward.new_cache()
        self.cached = 0

    @torch.inference_mode()
    def propose(self, context: list[int]) -> TokenTree:
        step = context[self.cached:]
        chain: list[int] = []
        alternatives: list[list[int]] = []
        for _ in range(self.num_tokens):
            past = self.cache.get_seq_length()
            positions = torch.arange(past, past + len(step), device=self.forward.device)[None]
            logits = self.forward(step, positions, None, self.cache, keep=1)[-1]
            ranked = logits.topk(1 + self.siblings).indices.tolist()
            chain.append(ranked[0])
            alternatives.append(ranked[1:])
            step = ranked[:1]
        # the last drafted token was never fed, so the cache holds context + chain[:-1]
        self.cached = len(context)
        self.chain = chain
        tokens, parents = [context[-1], *chain], list(range(-1, len(chain)))
        for depth, others in enumerate(alternatives):
            for token in others:
                tokens.append(token)
                parents.append(depth)
        return TokenTree(tokens, parents)

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        valid = 0
        while valid < min(len(accepted) - 1, len(self.chain) - 1) and accepted[valid] == self.chain[valid]:
            valid += 1
        if len(self.chain) - 1 > valid:
            self.cache.crop(-(len(self.chain) - 1 - valid))
        self.cached += valid

    def finish(self) -> None:
        self.cache = None
