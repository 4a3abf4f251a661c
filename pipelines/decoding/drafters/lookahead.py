"""alipay Lookahead (Zhao et al., KDD 2024, arXiv 2312.12728): a trie of n-grams from the prompt and from
generated output, retrieved as a multi-branch token tree.

Every branch of ``branch_length + 1`` tokens is inserted below its first token. Prompt branches count in a
per-request frequency that is reset when the request ends; output branches count in a global frequency
that persists across requests (what makes repeated or RAG-style traffic fast). Retrieval matches the last
1..``max_query_length`` tokens, then keeps the ``decoding_length`` most frequent reachable nodes no deeper
than ``branch_length``. When output nodes outgrow ``max_nodes`` the trie is squeezed: output frequencies are
halved and nodes with no frequency left are dropped, down to a low-water mark so the squeeze is rare. As in
alipay's per-token trees, each root also has its own output cap (``max_root_nodes``): a token followed by many
different continuations (a newline, a comma) squeezes only its own sub-trie, not everyone's memory.

Prompt nodes do not count against ``max_nodes`` and only the last ``prompt_window`` prompt tokens are indexed:
a long pasted document then costs a bounded insert and cannot evict the earlier answers' n-grams (the
cross-request memory the trie exists for). Forgetting the prompt at the end of a request visits only the nodes
the prompt held: walking the whole shared trie there cost every request time that grew with the traffic served
(tens of thousands of output nodes: ~0.1 s per request, more than a short answer's whole decode on a GPU).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..tree import TokenTree
from ..verify import Drafter


@dataclass
class LookaheadConfig:
    # alipay defaults: decoding_length 64, branch_length 12, 2-token queries, 65536 nodes.
    decoding_length: int = 64
    branch_length: int = 12
    max_query_length: int = 2
    max_nodes: int = 65536
    max_root_nodes: int = 512  # alipay's max_output_node: output nodes one root's sub-trie may hold
    prompt_weight: float = 1.0  # a prompt occurrence counts as much as an output one when ranking
    prompt_window: int = 2048  # only the prompt's last tokens are indexed (bounded start on long prompts)


class TrieNode:
    """A trie node; on a root, ``size`` counts the nodes below it and ``held`` those the prompt holds."""

    __slots__ = ("children", "prompt", "output", "size", "held")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.prompt = 0
        self.output = 0
        self.size = 0
        self.held = 0


class NGramTrie:
    """``roots[t]`` is the trie of continuations seen after token ``t``."""

    def __init__(self, max_nodes: int, max_root_nodes: int = LookaheadConfig.max_root_nodes) -> None:
        self.roots: dict[int, TrieNode] = {}
        self.max_nodes = max_nodes
        self.max_root_nodes = max_root_nodes
        self.nodes = 0
        # (root token, parent, token, node) per node the prompt holds, parents before children
        self.prompt_nodes: list[tuple[int, TrieNode, int, TrieNode]] = []
        self.prunes = 0  # squeezes and prompt resets so far: a node held from before one may have been dropped

    def insert(self, branch: list[int], from_prompt: bool) -> None:
        """Count every node of ``branch`` (below its first token) once."""
        root = node = self._root(branch[0])
        for token in branch[1:]:
            node = self._count(root, node, token, from_prompt, key=branch[0])
        if not from_prompt:
            self._bound(branch[0])

    def extend(self, branch: list[int], tip: TrieNode | None = None) -> TrieNode:
        """Count only the last node of an output ``branch`` whose earlier nodes were counted when they
        were generated: streaming the output this way counts each branch once, like ``insert`` would. ``tip``,
        when the caller holds it, is the node of ``branch[:-1]`` (what this returned for that branch, no prune
        since): the walk down to it is skipped. Returns the node of ``branch``."""
        root = node = self._root(branch[0])
        if tip is not None:
            node = tip
        else:
            for token in branch[1:-1]:
                node = node.children.get(token) or self._count(root, node, token, False, 0)
        node = self._count(root, node, branch[-1], False)
        self._bound(branch[0])
        return node

    def _root(self, token: int) -> TrieNode:
        node = self.roots.get(token)
        if node is None:
            node = self.roots[token] = TrieNode()
        return node

    def _count(self, root: TrieNode, node: TrieNode, token: int, from_prompt: bool, amount: int = 1,
               key: int = -1) -> TrieNode:
        """Count ``token`` below ``node`` (in the sub-trie of ``root``, whose token is ``key``: prompt counts only)."""
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = TrieNode()
            self.nodes += 1
            root.size += 1
        if from_prompt:
            if child.prompt == 0:
                self.prompt_nodes.append((key, node, token, child))
                root.held += 1
            child.prompt += amount
        else:
            child.output += amount
        return child

    def _bound(self, key: int) -> None:
        root = self.roots[key]
        if root.size - root.held > self.max_root_nodes:
            self.squeeze_root(root)
            if not root.children:  # gone now: the end of the request no longer walks every root
                del self.roots[key]
        if self.output_nodes() > self.max_nodes:
            self.squeeze()

    def output_nodes(self) -> int:
        """Nodes held for output, the ones the budget bounds (the request's prompt nodes are freed at its end)."""
        return self.nodes - len(self.prompt_nodes)

    def reset_prompt(self) -> None:
        """Forget the finished request's prompt counts and drop the nodes only the prompt held: children before
        their parents, so a branch the output never reached goes whole. Costs the prompt's nodes, not the trie's."""
        self.prunes += 1
        for key, parent, token, node in reversed(self.prompt_nodes):
            node.prompt = 0
            root = self.roots[key]
            root.held = 0
            if node.output == 0 and not node.children:
                del parent.children[token]
                root.size -= 1
                self.nodes -= 1
                if not root.children:
                    del self.roots[key]
        self.prompt_nodes = []

    def squeeze(self) -> None:
        """Halve output frequencies and drop what falls to zero, until under the low-water mark (3/4 of
        the budget), so a full trie is not re-walked on every insert."""
        self.prunes += 1
        while self.output_nodes() > self.max_nodes * 3 // 4:
            for root in self.roots.values():
                _halve(root)
            before = self.nodes
            self._prune()
            if self.nodes == before:
                break

    def squeeze_root(self, root: TrieNode) -> None:
        """The same squeeze on one root's sub-trie, down to 3/4 of its cap."""
        self.prunes += 1
        while root.size - root.held > self.max_root_nodes * 3 // 4:
            _halve(root)
            removed = _prune_below(root)
            root.size -= removed
            self.nodes -= removed
            if not removed:
                break

    def _prune(self) -> None:
        for token in list(self.roots):
            root = self.roots[token]
            removed = _prune_below(root)
            root.size -= removed
            self.nodes -= removed
            if not root.children:
                del self.roots[token]

    def match(self, suffix: list[int]) -> TrieNode | None:
        node = self.roots.get(suffix[0])
        for token in suffix[1:]:
            if node is None:
                return None
            node = node.children.get(token)
        return node


def _halve(root: TrieNode) -> None:
    """Halve every output frequency below ``root``."""
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            child.output //= 2
            stack.append(child)


def _prune_below(node: TrieNode) -> int:
    """Drop the leaves below ``node`` that neither the prompt nor the output counts (repeatedly, bottom-up);
    returns how many nodes went."""
    removed = 0
    for token in list(node.children):
        child = node.children[token]
        removed += _prune_below(child)
        if child.prompt == 0 and child.output == 0 and not child.children:
            del node.children[token]
            removed += 1
    return removed


class LookaheadTrie(Drafter):
    """Drafts the most frequent continuations of the current suffix as a tree (DFS order, as alipay ravels
    it, so the most frequent branch is contiguous after the root)."""

    def __init__(self, config: LookaheadConfig | None = None, trie: NGramTrie | None = None) -> None:
        self.config = config or LookaheadConfig()
        self.trie = trie if trie is not None else NGramTrie(self.config.max_nodes, self.config.max_root_nodes)
        self.output: list[int] = []
        # per start of an open output branch: the node its last extend returned and the trie's prunes before it
        self.tips: dict[int, tuple[TrieNode, int]] = {}

    def start(self, prompt: list[int]) -> None:
        width = self.config.branch_length + 1
        for i in range(max(0, len(prompt) - self.config.prompt_window), len(prompt) - 1):
            self.trie.insert(prompt[i:i + width], from_prompt=True)
        # output branches may start inside the prompt's tail, as they would in one stream
        self.output = prompt[-self.config.branch_length:]
        self.tips = {}

    def propose(self, context: list[int]) -> TokenTree:
        return self.scored(context)[0]

    def scored(self, context: list[int]) -> tuple[TokenTree, list[float], int]:
        """The tree, each node's frequency score (the root's is 0) and the length of the matched query."""
        config = self.config
        match = None
        for length in range(min(config.max_query_length, len(context)), 0, -1):
            match = self.trie.match(context[-length:])
            if match is not None and match.children:
                break
        if match is None or not match.children or config.decoding_length < 2:
            return TokenTree([context[-1]], [-1]), [0.0], 0

        def score(node: TrieNode) -> float:
            return config.prompt_weight * node.prompt + node.output

        # best-first over the sub-trie: a node is only reachable once its parent is taken
        order = 0
        heap = [(-score(child), (order := order + 1), token, child, 0, 1) for token, child in match.children.items()]
        heapq.heapify(heap)
        picked: list[tuple[int, int, TrieNode]] = []  # (token, parent index in picked+root, node)
        kids: list[list[int]] = [[]]
        while heap and len(picked) < config.decoding_length - 1:
            _, _, token, node, parent, depth = heapq.heappop(heap)
            picked.append((token, parent, node))
            kids.append([])
            kids[parent].append(len(picked))
            if depth < config.branch_length:
                for child_token, child in node.children.items():
                    heapq.heappush(heap, (-score(child), (order := order + 1), child_token, child, len(picked), depth + 1))
        tokens, parents, depths, scores = [context[-1]], [-1], [0], [0.0]
        stack = [(child, 0) for child in reversed(kids[0])]
        while stack:
            index, parent = stack.pop()
            tokens.append(picked[index - 1][0])
            parents.append(parent)
            depths.append(depths[parent] + 1)
            scores.append(score(picked[index - 1][2]))
            here = len(tokens) - 1
            stack.extend((child, here) for child in reversed(kids[index]))
        return TokenTree(tokens, parents, depths), scores, length

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        """Stream the accepted tokens into the trie. Each open branch grows by one token per step, so its last
        node is held and the next extend starts there instead of walking down from the root (unless a prune
        may have dropped it)."""
        trie, tips = self.trie, self.tips
        for token in accepted:
            self.output.append(token)
            end = len(self.output)
            first = max(0, end - 1 - self.config.branch_length)
            tips.pop(first - 1, None)  # that branch is full: it no longer grows
            for start in range(first, end - 1):
                held = tips.get(start)
                prunes = trie.prunes
                tip = held[0] if held is not None and held[1] == prunes else None
                tips[start] = (trie.extend(self.output[start:end], tip), prunes)

    def finish(self) -> None:
        self.output = []
        self.tips = {}
        self.trie.reset_prompt()

