"""Token Recycling (Luo et al., "Turning Trash into Treasure", arXiv 2408.08696).

The whole state is a ``[vocab, k]`` adjacency matrix: row ``t`` holds the top-k tokens the model most
recently predicted after ``t``. After every verification forward, the top-k of *every* tree node's logits
is written back, rejected branches included (the recycled "trash"). Drafting fills a static tree template:
a node with child rank ``r`` below a node holding token ``t`` gets ``matrix[t, r]``. The matrix lives as long
as the model (the paper's hot start across requests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..captured import CapturedCalls, capture_supported
from ..tree import TokenTree
from ..verify import Drafter

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


def build_template(level_sizes: tuple[int, ...] = LEVEL_SIZES,
                   rank_prior: tuple[float, ...] = RANK_PRIOR) -> TreeTemplate:
    """Fill each level with its most probable (parent, rank) pairs under ``rank_prior``, then order all
    nodes by path probability (a child is never more probable than its parent, so parents stay first)."""
    paths: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    level = [((), 1.0)]
    for size in level_sizes:
        candidates = [(path + (rank,), prob * rank_prior[rank])
                      for path, prob in level for rank in range(len(rank_prior))]
        candidates.sort(key=lambda item: -item[1])
        level = candidates[:size]
        paths.extend(level)
    order = sorted(range(len(paths)), key=lambda i: (-paths[i][1], len(paths[i][0]), i))
    position = {paths[i][0]: n for n, i in enumerate(order)}
    parents = tuple(position[paths[i][0][:-1]] if paths[i][0] else -1 for i in order)
    ranks = tuple(paths[i][0][-1] if paths[i][0] else 0 for i in order)
    return TreeTemplate(parents, ranks, tuple(paths[i][1] for i in order))


DEFAULT_TEMPLATE = build_template()

class TokenRecycling(Drafter):
    """Drafts a prefix of the template from the adjacency matrix and recycles every node's top-k into it.
    Also counts, per template node, how often it was offered and accepted: the hardware-aware tree size
    uses those rates."""

    def __init__(self, matrix: torch.Tensor, template: TreeTemplate = DEFAULT_TEMPLATE, nodes: int | None = None,
                 probs: torch.Tensor | None = None) -> None:
        self.matrix = matrix
        # the probability each candidate had when it was recorded: how sure the model was, for the merged drafter
        self.probs = probs if probs is not None else torch.zeros(matrix.shape, device=matrix.device)
        self.template = template
        self.calls = CapturedCalls(capture_supported(matrix.device))
        self._levels: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.offered = [0] * len(template)
        self.accepted = [0] * len(template)
        self.resize(nodes or len(template))

    def resize(self, nodes: int) -> None:
        """Draft only the first ``nodes`` template nodes (root included). Each size's index tensors are built once
        and kept: a captured graph of that size reads them."""
        self.active = self.template.truncated(nodes)
        self._depths = TokenTree([0] * len(self.active), list(self.active.parents)).depths
        if len(self.active) not in self._levels:
            self._levels[len(self.active)] = template_levels(self.active, self.matrix.device)
        self.levels = self._levels[len(self.active)]

    def propose(self, context: list[int]) -> TokenTree:
        return self.scored(context)[0]

    def scored(self, context: list[int]) -> tuple[TokenTree, list[float]]:
        """The tree and, per node, the probability its token had after its parent's when it was recorded."""
        return self.read(self.launch(context[-1]))

    def launch(self, root: int) -> torch.Tensor:
        """Start filling the template below ``root``: one captured graph per tree size on a GPU, whose output
        buffer ``read`` takes (valid until the next launch of this size)."""
        root_id = torch.tensor(root).to(self.matrix.device, non_blocking=True)
        return self.calls.call(len(self.active), self.fill, root_id)

    def read(self, filled: torch.Tensor) -> tuple[TokenTree, list[float]]:
        """``scored``'s result from a launched fill: the one read from the device."""
        tokens, probs = filled.tolist()
        return TokenTree(list(map(int, tokens)), list(self.active.parents), list(self._depths)), probs

    def fill(self, root: torch.Tensor) -> torch.Tensor:
        """The active template filled from the matrix below ``root``: ``[2, n]`` float64 rows, tokens then the
        probabilities they were recorded with (fixed shapes for a given template size)."""
        tokens = root.reshape(1).expand(len(self.active)).clone()
        probs = torch.ones(len(self.active), device=self.matrix.device)
        for nodes, parents, ranks in self.levels:
            rows = tokens[parents]
            tokens[nodes] = self.matrix[rows, ranks]
            probs[nodes] = self.probs[rows, ranks]
        return torch.stack([tokens.double(), probs.double()])

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        self.recycle(tree.tokens, logits)
        self.count(tree, accepted)

    def count(self, tree: TokenTree, accepted: list[int]) -> None:
        """One more offer of every template node of ``tree`` and one more acceptance of those on the ``accepted``
        path; none for a tree cut short at the end of a request (node indices no longer match the template)."""
        if len(tree) != len(self.active) or tree.parents != list(self.active.parents):
            return
        for i in range(len(tree)):
            self.offered[i] += 1
        for node in tree.path_of(accepted):
            self.accepted[node] += 1

    def recycle(self, tokens: list[int] | torch.Tensor, logits: torch.Tensor) -> None:
        """Every node's top-k becomes its token's row (``logits``: one raw row per token), rejected nodes included."""
        rows = torch.as_tensor(tokens).to(self.matrix.device, non_blocking=True)  # staged, no wait for the device
        logits = logits.float()
        top = logits.topk(self.matrix.shape[1], dim=-1)
        self.matrix[rows] = top.indices.to(self.matrix.device)
        # softmax then gather: on a CPU half the time of a logsumexp over the same rows
        self.probs[rows] = logits.softmax(-1).gather(-1, top.indices).to(self.probs.device)

    def acceptance_rates(self, prior_weight: float = 20.0) -> list[float]:
        """Per template node, how often it was on the accepted path when offered, smoothed by the prior."""
        return [(accepted + prior_weight * prior) / (offered + prior_weight)
                for accepted, offered, prior in zip(self.accepted, self.offered, self.template.prior)]


def depth_levels(parents: list[int] | tuple[int, ...],
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per depth below the root of a tree given by its ``parents`` (parents first): its node indices there and
    their parents, so work that flows down the tree (filling, acceptance) runs one level at a time."""
    depths = TokenTree([0] * len(parents), list(parents)).depths
    levels = []
    for level in range(1, max(depths) + 1):
        nodes = [i for i, d in enumerate(depths) if d == level]
        levels.append((torch.tensor(nodes, device=device), torch.tensor([parents[i] for i in nodes], device=device)))
    return levels


def template_levels(active: TreeTemplate,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per depth below the root: the template's node indices there, their parents and their child ranks."""
    ranks = torch.tensor(active.ranks, device=device)
    return [(nodes, parents, ranks[nodes]) for nodes, parents in depth_levels(active.parents, device)]


def cold_matrix(vocab: int, device: torch.device | str = "cpu", k: int = TOP_K) -> torch.Tensor:
    """An adjacency matrix before any forward: every row holds k distinct tokens, so a cold row's siblings
    are k different guesses rather than k copies of token 0 (which verify the same path k times)."""
    return torch.arange(k, device=device).repeat(vocab, 1)

