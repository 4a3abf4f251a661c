"""A token tree to verify in one forward: node 0 is the root (the last committed token), every other node
hangs below an earlier node. The ancestor-or-self mask and depth-based position ids make one forward
score every root-to-node path as if it had been decoded on its own (SpecInfer / Token Recycling / alipay
Lookahead all use this layout)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TokenTree:
    """``tokens[i]`` hangs below ``parents[i]`` (``parents[0] == -1``, and ``parents[i] < i``). A builder that
    tracks every node's depth passes ``depths`` and the per-node walk that checks the layout and derives them is
    skipped (the merged drafter builds several trees per step; this walk was a tenth of its host time)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int] | None = None
    _ancestors: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("A token tree needs a root (parent -1) and one parent per token.")
        if self.depths is not None:
            return
        depths = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            parent = self.parents[i]
            if not 0 <= parent < i:
                raise ValueError(f"Node {i} has parent {parent}; parents must come before their children.")
            depths[i] = depths[parent] + 1
        self.depths = depths

    @classmethod
    def chain(cls, root: int, draft: list[int]) -> "TokenTree":
        return cls([root, *draft], list(range(-1, len(draft))), list(range(len(draft) + 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def children(self) -> list[dict[int, int]]:
        """Per node, token -> child index (the first such child when a token repeats among siblings)."""
        table: list[dict[int, int]] = [{} for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            table[self.parents[i]].setdefault(self.tokens[i], i)
        return table

    def path_of(self, tokens: list[int], children: list[dict[int, int]] | None = None) -> list[int]:
        """The nodes reached from the root by following ``tokens`` (root first), up to the first token that has
        no child there: after verification, the accepted path. ``children`` is ``self.children()`` if at hand;
        without it each step scans for the child (a table of every node's children costs more than the walk)."""
        nodes = [0]
        for token in tokens:
            child = children[nodes[-1]].get(token) if children is not None else self.child(nodes[-1], token)
            if child is None:
                break
            nodes.append(child)
        return nodes

    def child(self, node: int, token: int) -> int | None:
        """The first child of ``node`` holding ``token`` (``list.index`` scans the parents in C)."""
        index = node
        try:
            while True:
                index = self.parents.index(node, index + 1)
                if self.tokens[index] == token:
                    return index
        except ValueError:
            return None

    def first_chain(self) -> "TokenTree":
        """The longest prefix of nodes that is a chain: what a model without 4D-mask support can verify."""
        length = 1
        while length < len(self.parents) and self.parents[length] == length - 1:
            length += 1
        if length == len(self.parents):
            return self  # trees are not changed once built
        return TokenTree(self.tokens[:length], self.parents[:length], self.depths[:length])

    def truncated(self, max_nodes: int | None = None, max_depth: int | None = None) -> "TokenTree":
        """The first ``max_nodes`` nodes (input order keeps parents first) no deeper than ``max_depth``: the tree
        itself when that is all of it (trees are not changed once built)."""
        if (max_nodes is None or max_nodes >= len(self)) and (max_depth is None or max(self.depths) <= max_depth):
            return self
        keep: list[int] = []
        index: dict[int, int] = {}
        for i, depth in enumerate(self.depths):
            if max_nodes is not None and len(keep) >= max_nodes:
                break
            if max_depth is not None and depth > max_depth:
                continue
            if i and self.parents[i] not in index:
                continue
            index[i] = len(keep)
            keep.append(i)
        return TokenTree([self.tokens[i] for i in keep], [index[self.parents[i]] if i else -1 for i in keep],
                         [self.depths[i] for i in keep])

    def ancestor_matrix(self, out: np.ndarray | None = None) -> np.ndarray:
        """``[n, n]`` bool: row i is True at i and at every ancestor of i. Built once per tree, one numpy step per
        level rather than one Python row per node; each caller gets its own copy, written into ``out`` (an
        ``[n, n]`` bool view: a block's tree part) when given."""
        if self._ancestors is None:
            n = len(self.tokens)
            up = np.asarray(self.parents)
            up[0] = 0
            rows, node = np.arange(n), np.arange(n)
            allowed = np.zeros((n, n), dtype=bool)
            for _ in range(max(self.depths) + 1):  # the root is its own parent: deeper steps stay on it
                allowed[rows, node] = True
                node = up[node]
            self._ancestors = allowed
        if out is None:
            return self._ancestors.copy()
        out[...] = self._ancestors
        return out


def block_visibility(tree: TokenTree, chain_before_root: int, past: int) -> np.ndarray:
    """``[q, past + q]`` bool for a block of ``chain_before_root`` committed tokens (causal), then the tree: every
    row sees the cached prefix, the chain is causal, tree nodes see the chain and their ancestors."""
    m, n = chain_before_root, len(tree)
    q = m + n
    allowed = np.zeros((q, past + q), dtype=bool)
    allowed[:, :past] = True
    allowed[:m, past:past + m] = np.tril(np.ones((m, m), dtype=bool))
    allowed[m:, past:past + m] = True
    allowed[m:, past + m:] = tree.ancestor_matrix()
    return allowed


def block_position_ids(tree: TokenTree, chain_before_root: int, past: int, device: torch.device) -> torch.Tensor:
    """Positions of the committed chain, then ``root position + depth`` for the tree nodes."""
    m = chain_before_root
    positions = list(range(past, past + m)) + [past + m + depth for depth in tree.depths]
    return torch.tensor([positions], device=device)
