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


class NGramTrie:
    """``roots[t]`` is the trie of continuations seen after token ``t``.

    A node is an id into flat per-node lists: ``children[n]`` (token -> child id), its ``prompt`` and ``output``
    counts and, on a root, ``size`` (the nodes below it) and ``held`` (those the prompt holds). Containers of ints
    only are not tracked by the garbage collector, so the trie, which persists across requests and grows to
    ``max_nodes``, adds nothing to its passes: as objects (a node and its dict each; ~700 new nodes a request of
    SmolLM2's answers) every node went through the collector's generations and each pass over the old ones
    walked the whole trie. Dropped ids (and their emptied dicts) are reused."""

    def __init__(self, max_nodes: int, max_root_nodes: int = LookaheadConfig.max_root_nodes) -> None:
        self.roots: dict[int, int] = {}
        self.children: list[dict[int, int]] = []
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.size: list[int] = []
        self.held: list[int] = []
        self.free: list[int] = []  # dropped ids
        self.max_nodes = max_nodes
        self.max_root_nodes = max_root_nodes
        self.nodes = 0
        # (root token, parent, token, node) per node the prompt holds, parents before children
        self.prompt_nodes: list[tuple[int, int, int, int]] = []
        self.prunes = 0  # squeezes and prompt resets so far: a node held from before one may have been dropped

    def insert(self, branch: list[int], from_prompt: bool) -> None:
        """Count every node of ``branch`` (below its first token) once."""
        root = node = self._root(branch[0])
        for token in branch[1:]:
            node = self._count(root, node, token, from_prompt, key=branch[0])
        if not from_prompt:
            self._bound(branch[0])

    def extend(self, branch: list[int], tip: int | None = None) -> int:
        """Count only the last node of an output ``branch`` whose earlier nodes were counted when they
        were generated: streaming the output this way counts each branch once, like ``insert`` would. ``tip``,
        when the caller holds it, is the node of ``branch[:-1]`` (what this returned for that branch, no prune
        since): the walk down to it is skipped. Returns the node of ``branch``."""
        root = node = self._root(branch[0])
        if tip is not None:
            node = tip
        else:
            for token in branch[1:-1]:
                child = self.children[node].get(token)
                node = child if child is not None else self._count(root, node, token, False, 0)
        node = self._count(root, node, branch[-1], False)
        self._bound(branch[0])
        return node

    def _new(self) -> int:
        if self.free:
            node = self.free.pop()  # its dict was emptied before it was dropped
            self.prompt[node] = self.output[node] = self.size[node] = self.held[node] = 0
            return node
        for values in (self.prompt, self.output, self.size, self.held):
            values.append(0)
        self.children.append({})
        return len(self.children) - 1

    def _root(self, token: int) -> int:
        node = self.roots.get(token)
        if node is None:
            node = self.roots[token] = self._new()
        return node

    def _count(self, root: int, node: int, token: int, from_prompt: bool, amount: int = 1, key: int = -1) -> int:
        """Count ``token`` below ``node`` (in the sub-trie of ``root``, whose token is ``key``: prompt counts only)."""
        child = self.children[node].get(token)
        if child is None:
            child = self.children[node][token] = self._new()
            self.nodes += 1
            self.size[root] += 1
        if from_prompt:
            if self.prompt[child] == 0:
                self.prompt_nodes.append((key, node, token, child))
                self.held[root] += 1
            self.prompt[child] += amount
        else:
            self.output[child] += amount
        return child

    def _bound(self, key: int) -> None:
        root = self.roots[key]
        if self.size[root] - self.held[root] > self.max_root_nodes:
            self.squeeze_root(root)
            if not self.children[root]:  # gone now: the end of the request no longer walks every root
                self._drop_root(key)
        if self.output_nodes() > self.max_nodes:
            self.squeeze()

    def _drop_root(self, key: int) -> None:
        self.free.append(self.roots.pop(key))

    def output_nodes(self) -> int:
        """Nodes held for output, the ones the budget bounds (the request's prompt nodes are freed at its end)."""
        return self.nodes - len(self.prompt_nodes)

    def reset_prompt(self) -> None:
        """Forget the finished request's prompt counts and drop the nodes only the prompt held: children before
        their parents, so a branch the output never reached goes whole. Costs the prompt's nodes, not the trie's."""
        self.prunes += 1
        children, prompt, output, size, held = self.children, self.prompt, self.output, self.size, self.held
        for key, parent, token, node in reversed(self.prompt_nodes):
            prompt[node] = 0
            root = self.roots[key]
            held[root] = 0
            if output[node] == 0 and not children[node]:
                del children[parent][token]
                self.free.append(node)
                size[root] -= 1
                self.nodes -= 1
                if not children[root]:
                    self._drop_root(key)
        self.prompt_nodes = []

    def squeeze(self) -> None:
        """Halve output frequencies and drop what falls to zero, until under the low-water mark (3/4 of
        the budget), so a full trie is not re-walked on every insert."""
        self.prunes += 1
        while self.output_nodes() > self.max_nodes * 3 // 4:
            for root in self.roots.values():
                self._halve(root)
            before = self.nodes
            self._prune()
            if self.nodes == before:
                break

    def squeeze_root(self, root: int) -> None:
        """The same squeeze on one root's sub-trie, down to 3/4 of its cap."""
        self.prunes += 1
        while self.size[root] - self.held[root] > self.max_root_nodes * 3 // 4:
            self._halve(root)
            removed = self._prune_below(root)
            self.size[root] -= removed
            self.nodes -= removed
            if not removed:
                break

    def _prune(self) -> None:
        for token in list(self.roots):
            root = self.roots[token]
            removed = self._prune_below(root)
            self.size[root] -= removed
            self.nodes -= removed
            if not self.children[root]:
                self._drop_root(token)

    def _halve(self, root: int) -> None:
        """Halve every output frequency below ``root``."""
        children, output = self.children, self.output
        stack = [root]
        while stack:
            for child in children[stack.pop()].values():
                output[child] //= 2
                stack.append(child)

    def _prune_below(self, node: int) -> int:
        """Drop the leaves below ``node`` that neither the prompt nor the output counts (repeatedly, bottom-up);
        returns how many nodes went."""
        removed = 0
        below = self.children[node]
        for token in list(below):
            child = below[token]
            removed += self._prune_below(child)
            if self.prompt[child] == 0 and self.output[child] == 0 and not self.children[child]:
                del below[token]
                self.free.append(child)
                removed += 1
        return removed

    def match(self, suffix: list[int]) -> int | None:
        node = self.roots.get(suffix[0])
        for token in suffix[1:]:
            if node is None:
                return None
            node = self.children[node].get(token)
        return node


class LookaheadTrie(Drafter):
    """Drafts the most frequent continuations of the current suffix as a tree (DFS order, as alipay ravels
    it, so the most frequent branch is contiguous after the root)."""

    def __init__(self, config: LookaheadConfig | None = None, trie: NGramTrie | None = None) -> None:
        self.config = config or LookaheadConfig()
        self.trie = trie if trie is not None else NGramTrie(self.config.max_nodes, self.config.max_root_nodes)
        self.output: list[int] = []
        # per start of an open output branch, the node its last extend returned; all of them from extends made since
        # the trie's ``tips_prunes``-th prune (a prune may drop any node)
        self.tips: dict[int, int] = {}
        self.tips_prunes = 0

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
        config, trie = self.config, self.trie
        children, prompt, output = trie.children, trie.prompt, trie.output
        match = None
        for length in range(min(config.max_query_length, len(context)), 0, -1):
            match = trie.match(context[-length:])
            if match is not None and children[match]:
                break
        if match is None or not children[match] or config.decoding_length < 2:
            return TokenTree([context[-1]], [-1]), [0.0], 0

        def score(node: int) -> float:
            return config.prompt_weight * prompt[node] + output[node]

        # best-first over the sub-trie: a node is only reachable once its parent is taken
        order = 0
        heap = [(-score(child), (order := order + 1), token, child, 0, 1) for token, child in children[match].items()]
        heapq.heapify(heap)
        picked: list[tuple[int, int, int]] = []  # (token, parent index in picked+root, node)
        kids: list[list[int]] = [[]]
        while heap and len(picked) < config.decoding_length - 1:
            _, _, token, node, parent, depth = heapq.heappop(heap)
            picked.append((token, parent, node))
            kids.append([])
            kids[parent].append(len(picked))
            if depth < config.branch_length:
                for child_token, child in children[node].items():
                    heapq.heappush(heap, (-score(child), (order := order + 1), child_token, child, len(picked),
                                          depth + 1))
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
        may have dropped it: then every held node is let go)."""
        trie, tips = self.trie, self.tips
        for token in accepted:
            self.output.append(token)
            end = len(self.output)
            first = max(0, end - 1 - self.config.branch_length)
            tips.pop(first - 1, None)  # that branch is full: it no longer grows
            for start in range(first, end - 1):
                if trie.prunes != self.tips_prunes:
                    tips.clear()
                    self.tips_prunes = trie.prunes
                tips[start] = trie.extend(self.output[start:end], tips.get(start))

    def finish(self) -> None:
        self.output = []
        self.tips = {}
        self.trie.reset_prompt()

