"""The one verifier: propose a token tree, score it in one forward, accept the longest path the model itself
would have produced plus one bonus token, roll the cache back. Drafters only decide the tree.

Cache rollback is crop + re-feed (reference §2.3 option b): after a forward the cache holds the committed
prefix, the root and every tree node. The nodes that sit contiguously right after the root *and* were
accepted are exactly what plain decoding would have cached (a chain drafter's accepted prefix always is),
so they stay; everything after them is dropped with ``cache.crop(-k)`` (the only form 5.24 accepts) and
the remaining accepted tokens are re-fed at the head of the next step as causal rows.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from ..base import CancelToken
from .plain import DecodeStats, SamplingConfig, accepts, cache_kwarg, choose_token, make_generator
from .tree import TokenTree, block_attention_mask, block_position_ids


class Drafter:
    """Where a tree's tokens come from. ``start``/``finish`` bracket one request; most drafters only need
    ``propose`` and ``update``."""

    def start(self, prompt: list[int]) -> None:
        """A new request begins with ``prompt`` (ids, the last one is the first root)."""

    def propose(self, context: list[int]) -> TokenTree:
        """A tree whose root is ``context[-1]`` (the last committed token)."""
        raise NotImplementedError

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """After verification: ``logits`` is ``[len(tree), vocab]`` (raw, one row per node) and ``accepted``
        the tokens committed this step (accepted path, then the bonus token)."""

    def finish(self) -> None:
        """The request is over (finished, stopped at EOS or cancelled)."""


class CausalLMForward:
    """How the core calls a model: any causal LM whose forward takes ``input_ids`` (or ``inputs_embeds`` via
    ``embed``), a 4D float mask, ``position_ids`` and a transformers cache, and returns ``.logits``.

    ``tree_attention=False`` is the chain-only mode for attention code that cannot take a 4D mask: trees
    are cut to their first chain and verified with the model's ordinary causal mask."""

    def __init__(self, model, tree_attention: bool = True, embed: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.tree_attention = tree_attention
        self.embed = embed
        self.kwarg = cache_kwarg(model)
        self.trims_logits = accepts(model, "logits_to_keep")
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def new_cache(self):
        return DynamicCache(config=self.model.config)

    def block_inputs(self, tree: TokenTree, before_root: int, past: int):
        """Mask (None for a chain: the model's own causal mask) and position ids for ``before_root`` committed
        tokens then ``tree``, appended at cache length ``past``; adapters with their own layout override it."""
        mask = None if tree.is_chain else block_attention_mask(tree, before_root, past, self.dtype, self.device)
        return mask, block_position_ids(tree, before_root, past, self.device)

    def __call__(self, ids: list[int], position_ids: torch.Tensor, mask: torch.Tensor | None, cache,
                 keep: int | None = None) -> torch.Tensor:
        """Logits ``[keep, vocab]`` for the last ``keep`` of ``ids`` (all when None) appended to ``cache``.
        Skipping the LM head on re-fed and prompt rows matters on a CPU: it is ~20% of a small model."""
        tensor = torch.tensor([ids], device=self.device)
        inputs = {"inputs_embeds": self.embed(tensor)} if self.embed is not None else {"input_ids": tensor}
        if keep is not None and self.trims_logits:
            inputs["logits_to_keep"] = keep
        out = self.model(**inputs, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.kwarg: cache})
        return out.logits[0, -keep:] if keep is not None else out.logits[0]


def accept(tree: TokenTree, logits: torch.Tensor, config: SamplingConfig,
           generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """Walk down from the root choosing the model's own token at each node (argmax, or a sample from the
    same processed distribution plain decoding uses) and follow the child holding it. Returns the accepted
    node indices and the committed tokens (their tokens, then the bonus). Sampling at the node and matching
    a deterministic draft is lossless (reference §2.4)."""
    children = tree.children()
    greedy = logits.argmax(-1).tolist() if config.greedy else None
    node, nodes, tokens = 0, [], []
    while True:
        token = greedy[node] if greedy is not None else choose_token(logits[node], config, generator)
        tokens.append(token)
        child = children[node].get(token)
        if child is None:
            return nodes, tokens
        nodes.append(child)
        node = child


def contiguous_accepted(nodes: list[int]) -> int:
    """How many accepted nodes sit right after the root in input order (their cache rows stay valid)."""
    count = 0
    while count < len(nodes) and nodes[count] == count + 1:
        count += 1
    return count


@torch.inference_mode()
def speculative_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    config: SamplingConfig,
    eos_ids: set[int],
    drafter: Drafter,
    cancel: CancelToken | None = None,
    stats: DecodeStats | None = None,
    forward: CausalLMForward | None = None,
) -> Iterator[list[int]]:
    """Same contract as ``plain_decode``, but each step yields the whole accepted run (1 + accepted drafts).
    Greedy output is token-for-token plain greedy; sampled output follows the same distribution."""
    stats = stats if stats is not None else DecodeStats()
    forward = forward or CausalLMForward(model)
    generator = make_generator(config, forward.device)
    cache = forward.new_cache()
    context = input_ids[0].tolist()
    pending = list(context)  # committed but not yet cached; the last one is the root
    produced = 0
    drafter.start(list(context))
    try:
        while produced < max_new_tokens:
            if cancel is not None:
                cancel.raise_if_cancelled()
            started = time.perf_counter()
            remaining = max_new_tokens - produced
            tree = drafter.propose(context).truncated(max_depth=remaining - 1)
            if not forward.tree_attention:
                tree = tree.first_chain()
            drafted = time.perf_counter()

            past = cache.get_seq_length()
            before_root = len(pending) - 1
            mask, positions = forward.block_inputs(tree, before_root, past)
            logits = forward(pending[:-1] + tree.tokens, positions, mask, cache, keep=len(tree))
            nodes, run = accept(tree, logits, config, generator)
            for i, token in enumerate(run):
                if token in eos_ids or i + 1 == remaining:
                    del run[i + 1:], nodes[i:]
                    break
            kept = contiguous_accepted(nodes)
            cache.crop(-(len(tree) - 1 - kept))
            pending = run[kept:]
            context.extend(run)

            updating = time.perf_counter()
            drafter.update(tree, logits, run)
            finished = time.perf_counter()
            stats.forwards += 1
            stats.new_tokens += len(run)
            stats.accepted_per_forward.append(len(run))
            stats.draft_s += (drafted - started) + (finished - updating)
            stats.step_s += finished - started
            produced += len(run)
            yield run
            if run[-1] in eos_ids:
                return
    finally:
        drafter.finish()
