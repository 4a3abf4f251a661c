"""Greedy acceptance on the device: the verifier's walk down the tree (take the model's argmax at a node, follow
the child holding it) computed for every node at once, so a step reads one small tensor back instead of
walking a Python dict per node.

Node ``i`` is on the accepted path when every node from the root down to it holds the argmax of its parent.
With the ancestor-or-self matrix ``A`` (the rows the verify forward's mask is built from) that is
``not any(A[i] & ~match)``; the accepted nodes form one root path, its deepest node is the leaf and the leaf's
argmax is the bonus token. Siblings holding the same token are resolved as the host walk does: the first one
counts, later copies never match.
"""
from __future__ import annotations

import torch

from .tree import TokenTree


def device_tree(tree: TokenTree, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree's tokens ``[n]`` and ancestor-or-self matrix ``[n, n]`` on ``device``, copied without waiting for
    the device (a pageable host-to-device copy is staged, not synchronised)."""
    tokens = torch.tensor(tree.tokens, dtype=torch.long)
    ancestors = torch.from_numpy(tree.ancestor_matrix())
    return tokens.to(device, non_blocking=True), ancestors.to(device, non_blocking=True)


def accepted_leaf(tokens: torch.Tensor, ancestors: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``[n + 1]`` long on the device: the accepted path as a 0/1 mask over the nodes (root included), then the
    bonus token. Pure tensor code, no host sync."""
    n = tokens.shape[0]
    choice = logits.argmax(-1)
    index = torch.arange(n, device=tokens.device)
    earlier = index[None, :] < index[:, None]  # [i, j]: j comes before i
    parent = torch.where(ancestors & earlier, index[None, :], -1).amax(-1)  # the nearest ancestor: largest index
    match = tokens == choice[parent.clamp(min=0)]
    same_slot = (parent[:, None] == parent[None, :]) & (tokens[:, None] == tokens[None, :]) & earlier
    match &= ~same_slot.any(-1)  # a later sibling with an earlier sibling's token is never walked into
    match[0] = True
    reached = ~(ancestors & ~match[None, :]).any(-1)
    depth = ancestors.sum(-1)
    leaf = torch.where(reached, depth, -1).argmax()
    return torch.cat([ancestors[leaf].long(), choice[leaf, None]])


def greedy_accept(tree: TokenTree, logits: torch.Tensor, tokens: torch.Tensor,
                  ancestors: torch.Tensor) -> tuple[list[int], list[int]]:
    """The accepted node indices (root excluded) and committed tokens (theirs, then the bonus), as
    ``verify.accept`` returns them for greedy decoding, with one read from the device."""
    packed = accepted_leaf(tokens, ancestors, logits).tolist()
    nodes = [i for i in range(1, len(tree)) if packed[i]]  # parents precede children: index order is path order
    return nodes, [tree.tokens[i] for i in nodes] + [packed[-1]]
