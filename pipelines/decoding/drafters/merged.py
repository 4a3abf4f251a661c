"""One verifier, many drafters: prompt lookup (one chain per matching n-gram length), the Lookahead trie's
branches and Token Recycling's tree are merged into one de-duplicated token trie per step, and the device's
cost curve decides how much of it to verify (reference §9.3: trees pay off where a wider forward is cheap;
PPD's hardware-aware size, applied per step to measured acceptance instead of a fixed template).

Every drafted node carries the sources that proposed it, each with a bucket (source, feature, depth, last):
the n-gram length and how far back the context agrees with the earlier spot for prompt lookup, the match length
and frequency for Lookahead, top-1 or not and the recorded probability for recycling; ``last`` says how the
previous step went (nothing accepted, part of it, or every level offered), which tells copying stretches (a
quoted passage, a translation) from free text. Per bucket the drafter counts how often a node whose parent was
on the accepted path was accepted itself; a node's conditional acceptance is the best of its sources' smoothed
rates, its path probability the product down from the root. The nodes are ranked by path probability (a child
never outranks its parent) and the verified prefix is the one with the most expected tokens per second of
forward. Verification is the one lossless verifier, so the output is plain greedy/sampled decoding (bit for bit
where the forward's rows do not depend on the block: fp32, or exact mode; see exact.py).
"""
from __future__ import annotations

import time
from itertools import islice
from typing import Sequence

import torch

from ..hardware import DraftingCost, StepPrices, pick_tree_size
from ..tree import TokenTree
from ..verify import Drafter
from .lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from .prompt_lookup import PromptLookup
from .prompt_tokens import PromptChains, PromptTokens
from .recurrent_drafter import FULL_OFFER, HeadDrafts
from .recycling import TokenRecycling

MAX_DEPTH = 12
DEPTH_BUCKETS = 6  # depths beyond this share a bucket
LOOKAHEAD_NODES = 64  # alipay's decoding length (the recycling template: the paper's 80); both caps on the offer
OFFER_FLOOR = 16  # candidates asked of the trie and the recycler: 4x the recent verified size, at least this
GRAFTS, GRAFT_NODES = 6, 16  # PPD guesses that get recycled successors, and how many (13 prompts: tau 2.56 -> 2.66)
PROB_BINS = 5  # recycled candidates are bucketed by the probability they had when recorded
MISSED, PARTIAL, FULL = 0, 1, 2  # the previous step accepted no drafted token, some, or one per level offered
HEAD_PROBE = 8  # requests: a draft head switched off for not paying for itself is tried again this often


def _bin(probability: float) -> int:
    return min(int(probability * PROB_BINS), PROB_BINS - 1)


# the features of ``_ranked``, built once: (top-1 or not, probability bin)
_RANK_FEATURES = tuple(tuple((top, b) for b in range(PROB_BINS)) for top in (0, 1))


def _ranked(ranks, probs: list[float]) -> list[tuple[int, int]]:
    """Per node, top-1 among its siblings or not, and the bin of its probability (the one recycling recorded, or the
    head's given the parent): the feature of recycled and head-drafted nodes. Read from a table, no call per node
    (~130 nodes a step: half the time of building each tuple)."""
    first, rest = _RANK_FEATURES
    top = PROB_BINS - 1
    return [(rest if rank else first)[min(int(p * PROB_BINS), top)] for rank, p in zip(ranks, probs)]


def _prior(bucket: tuple) -> float:
    """Starting estimate until a bucket has been measured."""
    source, feature = bucket[0], bucket[1]
    if source == "pld":
        n, agreed = feature
        return (0.3, 0.5, 0.6, 0.75, 0.85)[agreed] if n >= 2 or agreed else 0.3
    if source == "lookahead":
        return 0.4 if feature[0] >= 2 else 0.25
    return (feature[1] + 0.5) / PROB_BINS * (1.0 if feature[0] == 0 else 0.5)


class CandidateTrie:
    """The step's de-duplicated trie of every source's candidates: per node its token, parent, depth, the ids of the
    buckets of the sources that proposed it (``buckets[id]`` is the bucket), and its children by token. Nodes name
    their buckets by id so the rates are estimated and read per distinct bucket: a bucket is a tuple, whose hash
    Python recomputes at every lookup (~300 nodes a step on a GPU's trees, each looked up twice)."""

    def __init__(self, root: int, last: int) -> None:
        self.tokens, self.parents, self.depths = [root], [-1], [0]
        self.sources: list[list[int]] = [[]]
        self.buckets: list[tuple] = []
        self._ids: dict[tuple, int] = {}
        self.children: list[dict[int, int]] = [{}]
        self.last = last  # how the previous step went: the last part of every bucket

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tree: TokenTree, source: str, features: list, at: int = 0, below: int = 0) -> list[int]:
        """Merge ``tree`` in below node ``at`` (whose depth is ``below``), no deeper than ``MAX_DEPTH`` under it.
        ``features[i]`` is ``source``'s feature of its node ``i`` (the root's is not read). Returns the trie node
        of each node of ``tree``."""
        where = [at] * len(tree)
        tokens, parents, depths, sources, children = self.tokens, self.parents, self.depths, self.sources, self.children
        ids, buckets, last = self._ids, self.buckets, self.last
        levels = [min(depth + below, DEPTH_BUCKETS) for depth in range(MAX_DEPTH + 1)]  # a tree depth's bucket
        for i, token, up, depth, feature in zip(range(1, len(tree)), islice(tree.tokens, 1, None),
                                                islice(tree.parents, 1, None), islice(tree.depths, 1, None),
                                                islice(features, 1, None)):
            if depth > MAX_DEPTH:
                continue  # and so are its descendants: parents come first
            bucket = (source, feature, levels[depth], last)
            bucket_id = ids.get(bucket)
            if bucket_id is None:
                bucket_id = ids[bucket] = len(buckets)
                buckets.append(bucket)
            parent = where[up]
            siblings = children[parent]
            node = siblings.get(token)
            if node is None:
                node = siblings[token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depths[parent] + 1)
                sources.append([bucket_id])
                children.append({})
            else:
                sources[node].append(bucket_id)
            where[i] = node
        return where


class HeadLedger:
    """Whether the draft head pays for its time in the merged tree, from the steps it drafted in: the accepted
    tokens only the head had proposed and the seconds its launch and read took (the read waits for its levels on
    the device), against the step's tokens and seconds. Without the head a step would commit ``tokens - gain`` in
    ``step - cost``, so the head pays while its share of the tokens exceeds its share of the time (an H100,
    SmolLM2-135M: the head alone spent ~1.3 ms of drafting a step). Switched off, it is tried again every
    ``HEAD_PROBE``-th request, so a change of prompts or device can bring it back."""

    def __init__(self, memory: float = 0.9) -> None:
        self.memory = memory  # per step: the estimate follows the last ~10 steps that drafted with the head
        self.gain = self.tokens = self.cost_s = self.step_s = 0.0
        self.off = 0  # requests since the head last drafted

    def observe(self, gain: int, tokens: int, cost_s: float, step_s: float) -> None:
        m = self.memory
        self.gain, self.tokens = self.gain * m + gain, self.tokens * m + tokens
        self.cost_s, self.step_s = self.cost_s * m + cost_s, self.step_s * m + step_s

    def pays(self) -> bool:
        if self.tokens == 0 or self.step_s == 0:
            return True  # nothing measured yet
        return self.gain / self.tokens > self.cost_s / self.step_s

    def wanted(self) -> bool:
        return self.pays() or self.off % HEAD_PROBE == HEAD_PROBE - 1

    def finished(self, drafted: bool) -> None:
        self.off = 0 if drafted else self.off + 1


class MergedDrafter(Drafter):
    """Merges ``lookup``, ``lookahead`` and ``recycler`` drafts into one trie and keeps the prefix that the
    cost curve ``costs`` (seconds per forward over n query tokens) pays for. Acceptance counts persist
    across requests (they describe the model and the device, not one prompt). With trained ``prompts``
    (PPD), the last step's prompt-token guesses are one more source (the best ``graft`` of them get a small
    recycled subtree of ``graft_nodes`` below, so a guess that is right is followed by its likely successors),
    and the verified tree carries prompt chains below the nodes likeliest to end the accepted path, as many as
    the cost curve pays for. With a trained draft head (ReDrafter, ``drafts``), its tree below the root is one
    more source where the cost curve affords wide trees (a GPU's) and, with a ``ledger``, while it pays for its time.
    With a ``host`` price (served), the tree-size rule also charges the measured host seconds of a drafted step, and
    where no tree pays for them the drafter takes plain steps that draft nothing (``hardware.DraftingCost``). The
    device's drafts for the next step start at the end of ``update``, so on a GPU they run while the host finishes
    the step and builds the next trie."""

    def __init__(self, costs: dict[int, float], recycler: TokenRecycling, lookahead: LookaheadTrie,
                 lookup: PromptLookup | None = None, max_nodes: int = 128, prior_weight: float = 8.0,
                 memory: float = 0.95, prompts: PromptTokens | None = None, graft: int = GRAFTS,
                 graft_nodes: int = GRAFT_NODES, drafts: HeadDrafts | None = None,
                 ledger: HeadLedger | None = None, host: DraftingCost | None = None) -> None:
        self.costs = costs
        self.recycler, self.lookahead = recycler, lookahead
        self.lookup = lookup or PromptLookup(num_tokens=MAX_DEPTH)
        self.max_nodes = max_nodes
        self.prior_weight = prior_weight
        # counts decay by this factor per observation of their bucket: acceptance drifts within a request
        # (a copied passage starts and ends), so the estimate follows the last ~1/(1 - memory) offers
        self.memory = memory
        self.offered: dict[tuple, int] = {}
        self.accepted: dict[tuple, int] = {}
        # the last proposal (before prompt chains), per node its bucket ids, and the buckets they name
        self.proposed = TokenTree([0], [-1], [0])
        self.sources: list[list[int]] = [[]]
        self.buckets: list[tuple] = []
        self.steps = self.nodes = 0  # trees proposed and their total size: the size the cost curve chose
        self.kept = float(max_nodes)  # running mean of the verified size
        self.lookahead_nodes = lookahead.config.decoding_length
        self.last = MISSED
        self.offer = self._offer_size()
        self.head_on = False  # this request reads the model's features for the draft head
        self.chains = PromptChains(prompts) if prompts is not None else None
        self.graft, self.graft_nodes = graft, graft_nodes
        self.drafts = drafts
        self.ledger = ledger
        self._step_started = self._head_s = 0.0  # this step's start and the seconds its head calls took
        self._prices = StepPrices()
        # the host's price of a drafted step for the tree-size rule, and its plain fallback (None: never priced)
        self.host = host
        self._launched: tuple | None = None  # (root, offer, recycler fill, head tree) started by ``update``
        self._plain_step = False  # this step drafts nothing (the plain fallback)

    @property
    def reads_hidden(self) -> bool:
        """Whether the next request needs the model's features: a head, and trees wide enough to use it (decided
        per request, so a CPU's forwards never pay for recording them), while it pays for its time."""
        return (self.drafts is not None and self.offer >= FULL_OFFER
                and (self.ledger is None or self.ledger.wanted()))

    def read_hidden(self, hidden: torch.Tensor) -> None:
        self.drafts.read_hidden(hidden)

    def start(self, prompt: list[int]) -> None:
        self.last = MISSED
        self._launched = None
        if self.host is not None:
            self.host.start()
        self.head_on = self.reads_hidden
        if self.chains is not None:
            self.chains.start()
        if self.drafts is not None:
            self.drafts.start()
        for drafter in (self.lookup, self.lookahead, self.recycler):
            drafter.start(prompt)

    def embedding(self, model):
        return self.chains.prompts.embedding(model) if self.chains is not None else None

    def trained_used(self) -> dict[str, bool]:
        """The draft head only where this request's trees were wide enough for it (never on a CPU's cost curve),
        else PPD's chains when there are prompt tokens."""
        return {"draft_head": bool(self.head_on), "ppd_prompt_tokens": self.chains is not None}

    def rate(self, bucket: tuple, known: dict[tuple, float] | None = None) -> float:
        """Smoothed acceptance of ``bucket``. Its prior is the same bucket one level up (depth 1: a fixed
        guess), so a depth that has never been offered inherits what the level above measured: otherwise
        a tree cut at depth 2 would never learn that depth 3 pays in a copying stretch. ``known`` holds the
        rates already estimated this step (many nodes share a bucket, and every bucket shares its parents)."""
        known = {} if known is None else known
        if bucket not in known:
            source, feature, depth, last = bucket
            prior = self.rate((source, feature, depth - 1, last), known) if depth > 1 else _prior(bucket)
            known[bucket] = ((self.accepted.get(bucket, 0) + self.prior_weight * prior)
                             / (self.offered.get(bucket, 0) + self.prior_weight))
        return known[bucket]

    def propose(self, context: list[int]) -> TokenTree:
        self._step_started = time.perf_counter()
        self._plain_step = self.host is not None and self.host.plain()
        if self._plain_step:
            self._launched = None
            return TokenTree.chain(context[-1], [])
        launched, self._launched = self._launched, None
        if launched is None or launched[:2] != (context[-1], self._offer_size()):
            launched = self._launch(context[-1])
        _, _, recycling, growing = launched
        trie = CandidateTrie(context[-1], self.last)
        for n, chain, agreed in self.lookup.matches(context):
            feature = (n, min(agreed.bit_length() - 1, 4))  # agreement 1, 2-3, 4-7, 8-15, 16
            trie.add(TokenTree.chain(context[-1], chain), "pld", [feature] * (len(chain) + 1))
        tree, scores, query = self.lookahead.scored(context)
        trie.add(tree, "lookahead", [(query, min(int(score), 3)) for score in scores])
        ranks = self.recycler.active.ranks
        tree, probs = self.recycler.read(recycling)
        trie.add(tree, "recycling", _ranked(ranks, probs))
        guesses = self.chains.guesses if self.chains is not None else None
        if guesses is not None:
            guessed, guess_ranks, path = guesses.tree(context[-1], self.offer)
            where = trie.add(guessed, "ppd",
                             [None] + [(min(guess_ranks[i], 1), _bin(path[i] / path[guessed.parents[i]]))
                                       for i in range(1, len(guessed))])
            for i in range(1, min(self.graft + 1, len(guessed))):  # the likeliest guesses come first
                sub, probs = self.recycler.scored([guessed.tokens[i]])
                trie.add(sub.truncated(max_nodes=self.graft_nodes), "recycling", _ranked(ranks, probs), at=where[i],
                         below=guessed.depths[i])
        reading = time.perf_counter()
        found = self.drafts.read(growing) if growing is not None else None
        self._head_s += time.perf_counter() - reading if growing is not None else 0.0
        if found is not None:
            drafted, head_ranks, conditional, _ = found
            trie.add(drafted, "redrafter", _ranked(head_ranks, conditional))
        return self._select(trie)

    def _launch(self, root: int) -> tuple:
        """Start the device's drafts below ``root`` (the recycler's fill; the head's levels where trees are wide):
        ``update`` starts them as soon as the bonus token is known, so on a GPU they run while the host finishes the
        step and builds the next trie; ``propose`` reads them after the host's own drafts."""
        self._limit_candidates()
        recycling = self.recycler.launch(root)
        wide = self.head_on and self.offer >= FULL_OFFER  # the head's levels cost the same whatever the width:
        # they pay only where wide trees are cheap (all 39 prompts on this CPU, 4-level chains: tau 1.56 -> 1.83 but
        # 1.30x -> 1.28x vanilla, 10 % drafting)
        launching = time.perf_counter()
        growing = self.drafts.launch(root, self.offer) if wide else None
        self._head_s = time.perf_counter() - launching if wide else 0.0
        return root, self.offer, recycling, growing

    def prices(self, sizes: int) -> list[float]:
        """``hardware.step_prices(self.costs, sizes)``, remembered per curve: ``_select`` asks for every size each
        step."""
        return self._prices(self.costs, max(sizes, self.max_nodes))

    def _offer_size(self) -> int:
        return min(1 << (max(OFFER_FLOOR, int(4 * self.kept)) - 1).bit_length(), len(self.recycler.template))

    def _limit_candidates(self) -> None:
        """Ask the trie and the recycler for about four times what the cost curve has recently kept (a power
        of two, so the recycler's template is rarely rebuilt): on a CPU, where 3-5 nodes are verified, merging
        80 + 64 candidates in Python cost more than the forward saved."""
        offer = self.offer = self._offer_size()
        if len(self.recycler.active) != offer:
            self.recycler.resize(offer)
        self.lookahead.config.decoding_length = min(self.lookahead_nodes, offer)

    def _select(self, trie: CandidateTrie) -> TokenTree:
        """Path probabilities, best prefix under the cost curve, then depth-first order with the likeliest
        child first (so the likeliest path's accepted nodes sit right after the root and keep their cache)."""
        path = self._path_probabilities(trie)
        # by (-path, depth, node): two stable sorts on list lookups, half the time of one sort on a Python key
        ranked = sorted(sorted(range(len(path)), key=trie.depths.__getitem__),
                        key=[-p for p in path].__getitem__)[:self.max_nodes]
        best = pick_tree_size([path[i] for i in ranked], self.costs, self.prices(len(ranked)),
                              self.host.charge if self.host is not None else 0.0)
        if self.host is not None:
            self.host.chose(best)
        tree, out_path = self._depth_first(trie, path, ranked[:best])
        self.steps, self.nodes = self.steps + 1, self.nodes + len(tree)
        self.kept = 0.9 * self.kept + 0.1 * len(tree)
        if self.chains is None:
            return tree
        return self.chains.attach(tree, out_path, sum(out_path), self.costs, self.max_nodes)

    def _path_probabilities(self, trie: CandidateTrie) -> list[float]:
        """Per trie node, the product down from the root of its conditional acceptance: the best of its sources'
        rates, scaled down with its siblings' where theirs add up past one (siblings exclude each other)."""
        known: dict[tuple, float] = {}  # every bucket shares its parents' estimates
        rates = [self.rate(bucket, known) for bucket in trie.buckets]
        rated = rates.__getitem__
        conditional = [1.0] + [rates[ids[0]] if len(ids) == 1 else max(map(rated, ids))
                               for ids in islice(trie.sources, 1, None)]
        for table in trie.children:
            if len(table) > 1:  # an only child's rate is at most one already
                total = sum([conditional[i] for i in table.values()])
                if total > 1.0:
                    for i in table.values():
                        conditional[i] /= total
        path = [1.0]
        for parent, node_conditional in zip(islice(trie.parents, 1, None), islice(conditional, 1, None)):
            path.append(path[parent] * node_conditional)
        return path

    def _depth_first(self, trie: CandidateTrie, path: list[float], kept: list[int]) -> tuple[TokenTree, list[float]]:
        """The ``kept`` nodes in depth-first order, likeliest child first (ties: the later node), and their path
        probabilities; keeps the tree and each node's bucket ids for ``update``, which reads them by node
        (``_proposed_index``): a token-path key per proposed node cost a tuple each, for the few that update reads."""
        below: dict[int, list[int]] = {node: [] for node in kept}  # a kept node's parent is kept: it ranks higher
        for node in sorted(sorted(kept), key=path.__getitem__):  # by (path, node): stacked least likely first
            if node:
                below[trie.parents[node]].append(node)
        order, out_parents = [0], [-1]
        stack: list[tuple[int, int]] = [(child, 0) for child in below[0]]
        pop, push = stack.pop, stack.append  # bound once: ~70 nodes a step
        while stack:
            node, parent = pop()
            here = len(order)
            order.append(node)
            out_parents.append(parent)
            for child in below[node]:
                push((child, here))
        tokens, depths, sources = trie.tokens, trie.depths, trie.sources
        tree = TokenTree([tokens[i] for i in order], out_parents, [depths[i] for i in order])
        self.proposed, self.sources, self.buckets = tree, [sources[i] for i in order], trie.buckets
        return tree, [path[i] for i in order]

    def update(self, tree: TokenTree, logits: torch.Tensor, accepted: list[int]) -> None:
        full_tree, full_logits = tree, logits
        if self.chains is not None:  # the prompt chains are read here; the other drafters see real tokens only
            real = self.chains.real_part(tree)
            tree, logits = tree.truncated(max_nodes=real), logits[:real]
        path = tree.path_of(accepted)
        if not self._plain_step:  # a plain step starts no device work: the matrix learns from drafted steps
            self.recycler.update(tree, logits, accepted)  # device work first: the next fill reads the rows it writes
        if self.head_on:
            self.drafts.update((path if full_tree is tree else full_tree.path_of(accepted))[-1])
        if not self._plain_step:
            self._observe(tree, path, full_tree, full_logits, accepted)
        elif self.chains is not None:
            self.chains.start()  # a plain step verified no chain: nothing guessed for the next one
        if self.host is None or not self.host.plain_left:
            self._launched = self._launch(accepted[-1])
        for drafter in (self.lookup, self.lookahead):
            drafter.update(tree, logits, accepted)
        drafted, depth = len(accepted) - 1, max(tree.depths)
        self.last = MISSED if drafted == 0 else (FULL if drafted == depth else PARTIAL)

    def drafting_took(self, seconds: float) -> None:
        if self.host is not None and not self._plain_step:
            self.host.spent(seconds)
            self.host.drafted()

    def _observe(self, tree: TokenTree, path: list[int], full_tree: TokenTree, full_logits: torch.Tensor,
                 accepted: list[int]) -> None:
        """A drafted step's outcome: per bucket, its offered nodes below the accepted path and which were accepted;
        what the head alone gained for its time; what the prompt chains guessed."""
        on_path = set(path)
        index, sources, buckets = self._proposed_index(tree), self.sources, self.buckets
        offered, accepted_counts, memory = self.offered, self.accepted, self.memory
        for i, parent in zip(range(1, len(tree)), tree.parents[1:]):
            if parent not in on_path or index[i] is None:
                continue
            hit = i in on_path
            for bucket_id in sources[index[i]]:
                bucket = buckets[bucket_id]
                offered[bucket] = offered.get(bucket, 0) * memory + 1
                accepted_counts[bucket] = accepted_counts.get(bucket, 0) * memory + hit
        if self.head_on and self.ledger is not None and self._head_s:
            alone = sum(1 for i in path[1:] if self._only_source(index[i], "redrafter"))
            self.ledger.observe(alone, len(accepted), self._head_s, time.perf_counter() - self._step_started)
        if self.chains is not None:
            if self.chains.guesses is not None:
                self.chains.credit(sum(1 for i in on_path if i and self._only_source(index[i], "ppd")))
            self.chains.read(full_tree, full_logits, accepted)

    def _proposed_index(self, tree: TokenTree) -> Sequence[int | None]:
        """Per node of the verified ``tree``, the proposed node holding the same tokens from the root (None: none
        does). The verified tree is nearly always the proposal or a prefix of it (a bucket's fit, the real part before
        prompt chains): the same indices. Only a cut by depth (a request's last tokens) renumbers it."""
        proposed, n = self.proposed, len(tree)
        if tree.parents == proposed.parents[:n] and tree.tokens == proposed.tokens[:n]:
            return range(n)
        found: list[int | None] = [0]
        for up, token in zip(tree.parents[1:], tree.tokens[1:]):
            found.append(proposed.child(found[up], token) if found[up] is not None else None)
        return found

    def _only_source(self, node: int | None, source: str) -> bool:
        """Whether proposed ``node`` was drafted by ``source`` alone."""
        return node is not None and {self.buckets[b][0] for b in self.sources[node]} == {source}

    def finish(self) -> None:
        self._launched = None
        for drafter in (self.lookup, self.lookahead, self.recycler):
            drafter.finish()
        if self.ledger is not None and self.drafts is not None and self.offer >= FULL_OFFER:
            self.ledger.finished(self.head_on)


def new_merged(recycled: TokenRecycling, trie: NGramTrie, costs: dict[int, float],
               prompts: PromptTokens | None = None, drafts: HeadDrafts | None = None,
               ledger: HeadLedger | None = None, host: DraftingCost | None = None) -> MergedDrafter:
    """A merged drafter over ``recycled``'s matrix and a Lookahead ``trie`` (both kept by the caller), with
    trained prompt tokens and a trained draft head when there are some; ``host`` prices its drafting."""
    return MergedDrafter(costs, TokenRecycling(recycled.matrix, probs=recycled.probs),
                         LookaheadTrie(LookaheadConfig(decoding_length=LOOKAHEAD_NODES), trie), prompts=prompts,
                         drafts=drafts, ledger=ledger, host=host)

