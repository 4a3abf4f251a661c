"""Greedy acceptance from one read of the device: the argmax of every verified row comes back in one transfer and
the walk down the tree (take the model's argmax at a node, follow the child holding it) runs on the host over the
tree's parent list. The walk visits only the accepted path (a few nodes, each child found by ``list.index`` in C),
while computing it on the device took ~45 small tensor ops a step (each a kernel launch on a GPU: ~0.3 ms of host
time on an H100 host, more than the walk) and, through a 0-dim index, two more reads. Siblings holding the same
token resolve as ``verify.accept`` resolves them: the first one counts.
"""
from __future__ import annotations

import torch

from .tree import TokenTree


def greedy_accept(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """The accepted node indices (root excluded) and committed tokens (theirs, then the bonus), as
    ``verify.accept`` returns them for greedy decoding, with one read from the device."""
    choice = logits.argmax(-1).tolist()
    node, nodes = 0, []
    while (child := tree.child(node, choice[node])) is not None:
        nodes.append(child)
        node = child
    return nodes, [tree.tokens[i] for i in nodes] + [choice[node]]
