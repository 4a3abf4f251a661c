"""Token Recycling (Luo et al., "Turning Trash into Treasure", arXiv 2408.08696).

The whole state is a ``[vocab, k]`` adjacency matrix: row ``t`` holds the top-k tokens the model most
recently predicted after ``t``. After every verification forward, the top-k of *every* tree node's logits
is written back, rejected branches included (the recycled "trash"). Drafting fills a static tree template:
a node with child rank ``r`` below a node holding token ``t`` gets ``matrix[t, r]``. The matrix lives as long
as the model (the paper's hot start across requests).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .tree import TokenTree
from .verify import Drafter

# Paper: k = 8 candidates per token; an 80-node tree of depth 6 with 8/21/25/15/8/3 nodes per level.
TOP_K = 8
LEVEL_SIZES = (8, 21, 25, 15, 8, 3)
# Prior probability that the rank-r candidate is the model's next token; only orders the template and
# seeds the acceptance estimate until measured rates take over.
RANK_PRIOR = (0.50, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.013)


@dataclass(frozen=True)
class TreeTemplate:
    """Static tree: ``parents[i]`` and child ``ranks[i]`` per node (node 0 = root), parents first, ordered by
    prior acceptance probability so any prefix is the best tree of that size."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    prior: tuple[float, ...]  # prior probability that node i is on the accepted path

    def __len__(self) -> int:
        return len(self.parents)

    def truncated(self, nodes: int) -> "TreeTemplate":
        """The first ``nodes`` nodes (root included)."""
        nodes = max(1, min(nodes, len(self)))
        return TreeTemplate(self.parents[:nodes], self.ranks[:nodes], self.prior[:nodes])


def build_template(level_sizes: tuple[int, ...] = LEVEL_SIZES, rank_prior: tuple[float, ...] = RANK_PRIOR) -> TreeTemplate:
    """Fill each level with its most probable (parent, rank) pairs under ``rank_prior``, then order all
    nodes by path probability (a child is never more probable than its parent, so parents stay first)."""
    paths: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    level = [((), 1.0)]
    for size in level_sizes:
        candidates = [(path + (rank,), prob * rank_prior[rank]) for path, prob in level for rank in range(len(rank_prior))]
        candidates.sort(key=lambda item: -item[1])
        level = candidates[:size]
        paths.extend(level)
    order = sorted(range(len(paths)), key=lambda i: (-paths[i][1], len(paths[i][0]), i))
    position = {paths[i][0]: n for n, i in enumerate(order)}
    parents = tuple(position[paths[i][0][:-1]] if paths[i][0] else -1 for i in order)
    ranks = tuple(paths[i][0][-1] if paths[i][0] else 0 for i in order)
    return TreeTemplate(parents, ranks, tuple(paths[i][1] for i in order))


DEFAULT_TEMPLATE = build_template()

_MATRICES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def shared_matrix(model: torch.nn.Module, top_k: int = TOP_K) -> torch.Tensor:
    """The model's adjacency matrix, created on first use and kept for the model's lifetime."""
    matrix = _MATRICES.get(model)
    if matrix is None or matrix.shape[1] != top_k:
        vocab = model.get_output_embeddings().weight.shape[0]
        matrix = torch.zeros(vocab, top_k, dtype=torch.long, device=next(model.parameters()).device)
        _MATRICES[model] = matrix
    return matrix


class TokenRecycling(Drafter):
    """Drafts the template from the adjacency matrix and recycles every node's top-k into it."""

    def __init__(self, matrix: torch.Tensor, template: TreeTemplate = DEFAULT_TEMPLATE) -> None:
        self.matrix = matrix
        self.set_template(template)

    def set_template(self, template: TreeTemplate) -> None:
        self.template = template
        device = self.matrix.device
        depth = [0] * len(template)
        for i in range(1, len(template)):
            depth[i] = depth[template.parents[i]] + 1
        self.levels = []
        for d in range(1, max(depth) + 1):
            nodes = [i for i in range(len(template)) if depth[i] == d]
            self.levels.append((torch.tensor(nodes, device=device),
                                torch.tensor([template.parents[i] for i in nodes], device=device),
                                torch.tensor([template.ranks[i] for i in nodes], device=device)))
        self.accepted_counts = [0] * len(template)
        self.steps = 0

    def propose(self, context: list[int]) -> TokenTree:
        tokens = torch.empty(len(self.template), dtype=torch.long, device=self.matrix.device)
        tokens[0] = context[-1]
        for nodes, parents, ranks in self.levels:
            tokens[nodes] = self.matrix[tokens[parents], ranks]
        return TokenTree(tokens.tolist(), list(self.template.parents))

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        rows = torch.tensor(tree.tokens, device=self.matrix.device)
        self.matrix[rows] = logits.topk(self.matrix.shape[1], dim=-1).indices.to(self.matrix.device)
        if len(tree) == len(self.template):
            self.steps += 1
            children, node = tree.children(), 0
            self.accepted_counts[0] += 1
            for token in accepted:
                node = children[node].get(token, -1)
                if node < 0:
                    break
                self.accepted_counts[node] += 1

    def acceptance_rates(self, prior_weight: float = 20.0) -> list[float]:
        """Per template node, the measured frequency of being on the accepted path, smoothed by the prior."""
        return [(count + prior_weight * prior) / (self.steps + prior_weight)
                for count, prior in zip(self.accepted_counts, self.template.prior)]
