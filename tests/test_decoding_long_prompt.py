"""Long prompts: the Lookahead trie starts fast and keeps the earlier answers' n-grams (prompt window, per-root
cap), and the prompt goes in under the model's causal mask."""
from __future__ import annotations

import gc
import random
import time

import torch

from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.verify import LONG_BLOCK, CausalLMForward, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import repetitive_prompt, run


def test_earlier_answer_survives_an_8000_token_prompt_and_start_is_fast():
    rng = random.Random(0)
    drafter = LookaheadTrie(LookaheadConfig(), NGramTrie(LookaheadConfig.max_nodes))
    answer = [rng.randrange(1000, 2000) for _ in range(2000)]
    drafter.start([1, 2, 3])
    drafter.update(None, torch.empty(0), answer)
    drafter.finish()
    document = [rng.randrange(2000, 30000) for _ in range(8000)]
    started = time.perf_counter()
    drafter.start(document)
    elapsed = time.perf_counter() - started
    tree = drafter.propose(answer[:101])
    drafter.finish()
    assert elapsed < 1.0, elapsed
    assert tree.tokens[1:5] == answer[101:105]


def test_one_roots_many_continuations_squeeze_only_that_root():
    """alipay's per-root output cap: a token followed by hundreds of different continuations keeps its
    frequent ones and leaves every other root's memory alone."""
    rng = random.Random(1)
    trie = NGramTrie(max_nodes=100_000, max_root_nodes=64)
    frequent = [5, 6, 7, 8]
    other = [9, 10, 11, 12]
    for _ in range(16):
        trie.insert(frequent, from_prompt=False)
    trie.insert(other, from_prompt=False)
    for _ in range(60):  # 180 new nodes under root 5: squeezed a few times
        trie.insert([5] + [rng.randrange(100, 30000) for _ in range(3)], from_prompt=False)
    assert trie.size[trie.roots[5]] <= 64 and trie.nodes == trie.size[trie.roots[5]] + trie.size[trie.roots[9]]
    assert trie.match(frequent) is not None and trie.match(other) is not None
    assert trie.output[trie.match(other)] == 1  # never halved: the squeeze stayed below root 5


def test_prompt_nodes_do_not_count_against_a_roots_cap():
    trie = NGramTrie(max_nodes=100_000, max_root_nodes=8)
    for i in range(50):
        trie.insert([5, 100 + i, 200 + i], from_prompt=True)
    trie.insert([5, 1, 2], from_prompt=False)
    assert trie.output[trie.match([5, 1, 2])] == 1 and trie.size[trie.roots[5]] == 102
    trie.reset_prompt()
    assert trie.size[trie.roots[5]] == 2 and trie.nodes == 2


class WalkingLookahead(LookaheadTrie):
    """The streaming update as it was before held branch tips: every extend walks down from the root."""

    def update(self, tree, logits, accepted):
        for token in accepted:
            self.output.append(token)
            end = len(self.output)
            for start in range(max(0, end - 1 - self.config.branch_length), end - 1):
                self.trie.extend(self.output[start:end])


def _trie_state(trie: NGramTrie, node: int) -> tuple:
    return (trie.prompt[node], trie.output[node], trie.size[node], trie.held[node],
            {t: _trie_state(trie, c) for t, c in sorted(trie.children[node].items())})


def _streamed(drafter_class, seed: int) -> tuple:
    """Four requests streamed into one small trie (squeezed often, per root and whole): the drafts and the trie."""
    rng, trie = random.Random(seed), NGramTrie(max_nodes=40, max_root_nodes=12)
    drafts = []
    for _ in range(4):
        drafter = drafter_class(LookaheadConfig(max_nodes=40, max_root_nodes=12), trie)
        context = [rng.randrange(12) for _ in range(rng.randint(2, 30))]
        drafter.start(list(context))
        for _ in range(50):
            tree, scores, query = drafter.scored(context)
            drafts.append((tree.tokens, tree.parents, scores, query))
            accepted = [rng.choice(context) if rng.random() < 0.5 else rng.randrange(12)
                        for _ in range(rng.randint(1, 5))]
            drafter.update(tree, torch.empty(0), accepted)
            context += accepted
        drafter.finish()
    return (drafts, {token: _trie_state(trie, root) for token, root in sorted(trie.roots.items())},
            trie.nodes, trie.prunes)


def test_held_branch_tips_count_what_walking_from_the_root_counts():
    for seed in range(6):
        held, walked = _streamed(LookaheadTrie, seed), _streamed(WalkingLookahead, seed)
        assert held[3] > 20  # squeezes happened between the held tips' extends
        assert held[:3] == walked[:3]


class MaskRecorder(CausalLMForward):
    """Records the size of every 4-D mask the verifier builds."""

    def __call__(self, ids, position_ids, mask, cache, keep=None):
        self.masks = getattr(self, "masks", []) + [None if mask is None else tuple(mask.shape)]
        return super().__call__(ids, position_ids, mask, cache, keep)


def test_a_long_prompt_goes_in_under_the_models_causal_mask():
    """A 4-D mask over the whole prompt is quadratic in it (8000 tokens: merged 2.8x plain on this CPU): the
    first step verifies a chain, later steps full trees."""
    model = tiny_causal_lm("llama", seed=0)
    prompt = repetitive_prompt(2, LONG_BLOCK + 40)
    reference = run(plain_decode(model, prompt, 12, SamplingConfig(), set()))
    forward = MaskRecorder(model)
    drafter = TokenRecycling(cold_matrix(320))
    assert run(speculative_decode(model, prompt, 12, SamplingConfig(), set(), drafter, forward=forward)) == reference
    assert forward.masks[0] is None and all(shape[-1] < prompt.shape[1] + 100 for shape in forward.masks[1:])
    assert all(shape is not None for shape in forward.masks[1:])


class WatchedChildren(dict):
    """A node's children that note being listed (what a walk over the trie does)."""

    listed = False

    def __iter__(self):
        WatchedChildren.listed = True
        return super().__iter__()


def test_ending_a_request_visits_only_what_its_prompt_held():
    """Every request ends by forgetting its prompt; walking the whole shared trie there made each request pay for
    all the traffic served before it (60k output nodes: ~0.17 s on this CPU, a short answer's whole decode
    on a GPU). The answers' n-grams stay, the prompt-only branches go, the rest of the trie is not touched."""
    rng = random.Random(2)
    trie = NGramTrie(LookaheadConfig.max_nodes)
    drafter = LookaheadTrie(LookaheadConfig(), trie)
    for _ in range(20):  # earlier requests' answers, under roots 1000..1999
        drafter.start([1000, 1001])
        drafter.update(None, torch.empty(0), [rng.randrange(1000, 2000) for _ in range(128)])
        drafter.finish()
    before = trie.nodes
    untouched = trie.roots[1500]
    trie.children[untouched] = WatchedChildren(trie.children[untouched])
    WatchedChildren.listed = False
    prompt = list(range(5, 25))  # the answer's branches start in its last 12 tokens (13..24)
    drafter.start(prompt)
    drafter.update(None, torch.empty(0), [30, 31])
    drafter.finish()
    assert not WatchedChildren.listed
    assert trie.output[trie.match([24, 30, 31])] == 1 and trie.prompt[trie.match([13, 14])] == 0
    assert trie.match([5, 6]) is None and 5 not in trie.roots and 12 not in trie.roots  # only the prompt held these
    assert trie.held[trie.roots[13]] == 0 and trie.prompt_nodes == []
    assert trie.nodes == before + sum(trie.size[root] for token, root in trie.roots.items() if token < 1000)


def test_the_shared_trie_adds_no_objects_for_the_garbage_collector():
    """The trie persists across requests and grows to ``max_nodes``: as objects (a node and its dict each) every node
    went through the collector's generations and each pass over the old ones walked them all."""
    rng = random.Random(3)
    trie = NGramTrie(LookaheadConfig.max_nodes)
    drafter = LookaheadTrie(LookaheadConfig(), trie)
    drafter.start([1, 2])
    gc.collect()
    tracked = len(gc.get_objects())
    for _ in range(3):
        drafter.start([rng.randrange(50) for _ in range(200)])
        drafter.update(None, torch.empty(0), [rng.randrange(3000) for _ in range(200)])
        drafter.propose([7])
        drafter.finish()
    gc.collect()
    assert trie.nodes > 5000 and len(gc.get_objects()) - tracked < 20
    assert not any(gc.is_tracked(children) for children in trie.children) and not gc.is_tracked(trie.roots)
