"""The decoding core is lossless: every drafter's output equals plain decoding, token for token."""
from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from pipelines.decoding.drafters.draft_model import DraftModel
from pipelines.decoding.hardware import measure_step_cost, pick_tree_size
from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from pipelines.decoding.drafters.merged import FULL, OFFER_FLOOR, PARTIAL, MergedDrafter, new_merged
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.recycling import DEFAULT_TEMPLATE, LEVEL_SIZES, TokenRecycling, build_template
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import CausalLMForward, Drafter, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import (FAMILIES, FLAT, STEEP, assert_identical_to_greedy, assert_sampling_reproduced,
                              repetitive_prompt, root_path, run, stop_inside_reference, tree_logits)


def greedy(model, prompt, max_new, eos=frozenset()) -> list[int]:
    return run(plain_decode(model, prompt, max_new, SamplingConfig(), set(eos)))


class RandomTreeDrafter(Drafter):
    """Random trees mixing recent context tokens (often right) and random tokens (usually wrong)."""

    def __init__(self, seed: int, size: int) -> None:
        self.rng, self.size = random.Random(seed), size

    def propose(self, context):
        tokens, parents = [context[-1]], [-1]
        for i in range(1, self.size):
            parents.append(self.rng.randrange(i))
            pick = context[-1 - self.rng.randrange(min(8, len(context)))]
            tokens.append(pick if self.rng.random() < 0.6 else self.rng.randrange(320))
        return TokenTree(tokens, parents)


class OracleDrafter(Drafter):
    """Knows the greedy continuation: puts it deep in a tree behind a wrong sibling (EOS lands mid-tree)."""

    def __init__(self, reference: list[int], depth: int = 6) -> None:
        self.reference, self.depth = reference, depth

    def start(self, prompt):
        self.prompt_length = len(prompt)

    def propose(self, context):
        done = len(context) - self.prompt_length
        path = self.reference[done:done + self.depth]
        tokens = [context[-1], (context[-1] + 1) % 320, *path]
        parents = [-1, 0, *range(0, len(path))]
        parents[2] = 0
        return TokenTree(tokens, [-1, 0, 0, *range(2, 1 + len(path))][:len(tokens)])


def drafters_for(model, family, reference):
    return {
        "recycling": TokenRecycling(torch.zeros(320, 8, dtype=torch.long)),
        "recycling_small_tree": TokenRecycling(torch.zeros(320, 8, dtype=torch.long), nodes=12),
        "lookahead": LookaheadTrie(LookaheadConfig(decoding_length=16, branch_length=4)),
        "prompt_lookup": PromptLookup(num_tokens=4),
        "merged_flat_cost": new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), FLAT),
        "merged_steep_cost": new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), STEEP),
        "draft_model": DraftModel(tiny_causal_lm(family, seed=0), num_tokens=3),
        "draft_model_tree": DraftModel(tiny_causal_lm(family, seed=1), num_tokens=4, siblings=2),
        "random_tree": RandomTreeDrafter(seed=7, size=24),
        "oracle": OracleDrafter(reference),
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed,prompt_length", [(0, 5), (1, 23), (2, 61)])
def test_every_drafter_output_identical_to_greedy(models, family, seed, prompt_length):
    model = models[family]
    prompt = repetitive_prompt(seed, prompt_length)
    reference = greedy(model, prompt, 30)
    assert_identical_to_greedy(model, prompt, lambda: drafters_for(model, family, reference))


def test_oracle_tree_accepts_deep_paths_and_stops_at_eos_mid_tree(models):
    model = models["llama"]
    prompt = repetitive_prompt(3, 17)
    reference = greedy(model, prompt, 40)
    eos, expected = stop_inside_reference(reference)
    assert greedy(model, prompt, 40, {eos}) == expected
    stats = DecodeStats()
    chunks = list(speculative_decode(model, prompt, 40, SamplingConfig(), {eos}, OracleDrafter(reference), stats=stats))
    assert [t for c in chunks for t in c] == expected
    assert max(len(c) for c in chunks) == 7  # six accepted drafts plus the bonus token
    assert chunks[-1][-1] == eos and len(chunks[-1]) > 1  # EOS came in the middle of an accepted run


@pytest.mark.parametrize("max_new", [1, 2, 9])
def test_max_new_tokens_respected_exactly_even_inside_a_run(models, max_new):
    model = models["llama"]
    prompt = repetitive_prompt(4, 12)
    reference = greedy(model, prompt, 20)
    out = run(speculative_decode(model, prompt, max_new, SamplingConfig(), set(), OracleDrafter(reference)))
    assert out == reference[:max_new]


def test_chain_only_mode_uses_no_4d_mask_and_stays_identical(models):
    model = models["qwen2"]
    prompt = repetitive_prompt(5, 20)
    reference = greedy(model, prompt, 25)
    masks = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        forward = CausalLMForward(model, tree_attention=False)
        out = run(speculative_decode(model, prompt, 25, SamplingConfig(), set(), OracleDrafter(reference),
                                     forward=forward))
    finally:
        hook.remove()
    assert out == reference
    assert all(mask is None for mask in masks)


def test_cancel_token_stops_between_steps(models):
    from pipelines.base import Cancelled, CancelToken

    cancel = CancelToken()
    steps = speculative_decode(models["llama"], repetitive_prompt(0, 8), 50, SamplingConfig(), set(),
                               PromptLookup(), cancel)
    next(steps)
    cancel.cancel()
    with pytest.raises(Cancelled):
        next(steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_a_seed_reproduces_plain_sampling(models, family):
    """One draw per committed token from the same processed logits and generator: same sample path."""
    assert_sampling_reproduced(models[family], {"random_tree": RandomTreeDrafter(3, 20)})


def test_sampled_token_pairs_follow_the_target_distribution(models):
    """Chi-square on the first two sampled tokens, with a drafter that always proposes the most likely pair."""
    model = models["llama"]
    prompt = repetitive_prompt(8, 10)
    config = SamplingConfig(temperature=0.05)  # random tiny weights: only a low temperature gives peaked cells
    with torch.inference_mode():
        first = (model(prompt).logits[0, -1].float() / 0.05).softmax(-1)
        top = first.topk(3).indices.tolist()
        seconds = {t: (model(torch.cat([prompt, torch.tensor([[t]])], 1)).logits[0, -1].float() / 0.05).softmax(-1)
                   for t in top}

    class TopPairDrafter(Drafter):
        def propose(self, context):
            a = top[0]
            return TokenTree([context[-1], a, int(seconds[a].argmax())], [-1, 0, 1])

    counts: dict[tuple[int, int], int] = {}
    draws = 1000
    for seed in range(draws):
        config.seed = seed
        pair = tuple(run(speculative_decode(model, prompt, 2, config, set(), TopPairDrafter())))
        counts[pair] = counts.get(pair, 0) + 1
    cells = [(a, int(b)) for a in top for b in seconds[a].topk(2).indices.tolist()]
    expected = [float(first[a] * seconds[a][b]) * draws for a, b in cells]
    observed = [counts.get(cell, 0) for cell in cells]
    rest_expected, rest_observed = draws - sum(expected), draws - sum(observed)
    assert sum(observed) > draws * 0.05  # the test has power: these cells are actually hit
    statistic = chisquare(observed + [rest_observed], expected + [rest_expected])
    assert statistic.pvalue > 0.001


class ChainOracle(OracleDrafter):
    def propose(self, context):
        done = len(context) - self.prompt_length
        return TokenTree.chain(context[-1], self.reference[done:done + self.depth])


class CacheSpy(CausalLMForward):
    def __call__(self, ids, position_ids, mask, cache, keep=None):
        self.cache = cache
        return super().__call__(ids, position_ids, mask, cache, keep)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drafter_type", [OracleDrafter, ChainOracle, RandomTreeDrafter])
def test_cache_after_rollback_equals_a_fresh_forward(models, family, drafter_type):
    """After every step the cache holds exactly a prefix of the committed ids, with the keys and values a
    fresh forward over that prefix computes (for chains: everything but the new root, nothing re-fed)."""
    model = models[family]
    prompt = repetitive_prompt(9, 19)
    reference = greedy(model, prompt, 16)
    drafter = RandomTreeDrafter(1, 12) if drafter_type is RandomTreeDrafter else drafter_type(reference)
    spy = CacheSpy(model)
    committed = prompt[0].tolist()
    for chunk in speculative_decode(model, prompt, 16, SamplingConfig(), set(), drafter, forward=spy):
        committed += chunk
        length = spy.cache.get_seq_length()
        assert len(committed) - len(chunk) <= length <= len(committed) - 1
        if drafter_type is ChainOracle:
            assert length == len(committed) - 1
        with torch.inference_mode():
            fresh = model(torch.tensor([committed[:length]]), use_cache=True).past_key_values
        for ours, theirs in zip(spy.cache.layers, fresh.layers):
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_logits_equal_plain_forward_of_each_root_path(models, family):
    model = models[family]
    prompt = repetitive_prompt(10, 9)[0].tolist()
    tree = RandomTreeDrafter(5, 15).propose(prompt)
    logits = tree_logits(CausalLMForward(model), prompt, tree)
    with torch.inference_mode():
        for node in range(len(tree)):
            plain = model(torch.tensor([prompt[:-1] + root_path(tree, node)])).logits[0, -1]
            torch.testing.assert_close(logits[node], plain, atol=1e-5, rtol=1e-4)


def test_ancestor_matrix_marks_each_node_and_its_ancestors_and_is_the_callers_own():
    rng = random.Random(3)
    for size in (1, 2, 17, 80, 130):
        parents = [-1] + [rng.randrange(i) if rng.random() < 0.6 else i - 1 for i in range(1, size)]
        tree = TokenTree(list(range(size)), parents)
        expected = torch.zeros(size, size, dtype=torch.bool)
        for node in range(size):
            expected[node, root_path(tree, node)] = True  # tokens are node indices here
        first = tree.ancestor_matrix()
        first[:] = False  # a caller's edit does not reach the next caller
        assert torch.equal(torch.from_numpy(tree.ancestor_matrix()), expected)


def test_path_of_follows_the_first_child_holding_each_token():
    tree = TokenTree([9, 4, 4, 5, 7, 5, 7], [-1, 0, 0, 1, 2, 2, 3])  # node 2 repeats node 1's token: never walked
    assert tree.path_of([4, 5, 7, 1]) == [0, 1, 3, 6]
    assert tree.path_of([4, 7]) == [0, 1] and tree.path_of([3]) == [0] and tree.path_of([]) == [0]
    rng = random.Random(4)
    for _ in range(200):
        size = rng.randint(1, 40)
        tree = TokenTree([rng.randrange(3) for _ in range(size)], [-1] + [rng.randrange(i) for i in range(1, size)])
        tokens = [rng.randrange(3) for _ in range(6)]
        assert tree.path_of(tokens) == tree.path_of(tokens, tree.children())


def test_recycling_template_has_the_papers_level_sizes():
    assert len(DEFAULT_TEMPLATE) == 81
    depth = [0] * len(DEFAULT_TEMPLATE)
    for i in range(1, len(depth)):
        assert DEFAULT_TEMPLATE.parents[i] < i
        depth[i] = depth[DEFAULT_TEMPLATE.parents[i]] + 1
    assert tuple(depth.count(d) for d in range(1, 7)) == LEVEL_SIZES
    assert list(DEFAULT_TEMPLATE.prior) == sorted(DEFAULT_TEMPLATE.prior, reverse=True)
    assert build_template((2, 1)).parents == (-1, 0, 1, 0)  # [0,0] (0.25) outranks [1] (0.14)


def test_recycling_matrix_recycles_rejected_branches_and_fills_the_template():
    matrix = torch.zeros(50, 8, dtype=torch.long)
    drafter = TokenRecycling(matrix, nodes=10)
    tree = drafter.propose([3])
    logits = torch.zeros(len(tree), 50)
    logits[:, 7] = 2.0
    logits[:, 9] = 1.0
    tree.tokens[5] = 42  # a rejected node: its row is recycled too
    drafter.update(tree, logits, [7])
    assert matrix[42, 0] == 7 and matrix[42, 1] == 9 and matrix[3, 0] == 7
    again = drafter.propose([3])
    assert again.tokens[1] == 7  # rank-0 child of the root comes from row 3
    assert len(again) == 10


def test_lookahead_trie_retrieves_multi_branch_tree_and_forgets_prompt_counts():
    drafter = LookaheadTrie(LookaheadConfig(decoding_length=8, branch_length=3))
    drafter.start([1, 2, 3, 4, 1, 2, 5, 6, 1, 2])
    tree = drafter.propose([1, 2])
    assert tree.tokens[0] == 2 and {3, 5} <= set(tree.tokens[1:])
    assert not tree.is_chain and len(tree) <= 8 and max(tree.depths) <= 3
    drafter.finish()
    assert drafter.trie.match([1, 2]) is None
    drafter.start([9, 9])
    drafter.update(TokenTree([9], [-1]), torch.zeros(1, 10), [7, 8, 7, 8])
    drafter.finish()
    drafter.start([0, 7])
    assert drafter.propose([0, 7]).tokens[1] == 8  # output n-grams persist across requests


def test_lookahead_trie_is_bounded_by_eviction():
    trie = NGramTrie(max_nodes=50)
    rng = random.Random(0)
    for _ in range(200):
        trie.insert([rng.randrange(20) for _ in range(5)], from_prompt=False)
    assert trie.nodes <= 50


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    drafter = PromptLookup(num_tokens=3)
    drafter.start([1, 2, 3, 4, 5, 1, 2, 8, 9, 1, 2])
    assert drafter.propose([1, 2, 3, 4, 5, 1, 2, 8, 9, 1, 2]).tokens == [2, 8, 9, 1]


def test_pick_tree_size_follows_the_cost_curve():
    rates = [1.0] + [0.5 ** (i // 4 + 1) for i in range(80)]
    flat = {1: 1.0, 128: 1.0}
    linear = {1: 1.0, 128: 128.0}
    assert pick_tree_size(rates, flat) == 81
    assert pick_tree_size(rates, linear) <= 3


def test_measure_step_cost_reports_every_size(models):
    costs = measure_step_cost(models["gpt2"], sizes=(1, 4, 16), context=8, repeats=1)
    assert sorted(costs) == [1, 4, 16] and costs[1] <= costs[4] <= costs[16]


def test_measured_curves_of_named_models_are_kept_across_processes(tmp_path, monkeypatch):
    from pipelines.decoding import hardware

    monkeypatch.setenv("TOKENWORKS_CACHE", str(tmp_path))
    model = tiny_causal_lm("llama", seed=0)
    model.config._name_or_path = "tests/named-llama"
    measured = {1: 0.01, 4: 0.02}
    monkeypatch.setattr(hardware, "measure_step_cost", lambda m, *args, **options: dict(measured))
    assert hardware.step_costs(model) == measured
    assert hardware.curve_file().exists()

    def fail(m, *args, **options):
        raise AssertionError("measured again")

    monkeypatch.setattr(hardware, "measure_step_cost", fail)
    again = tiny_causal_lm("llama", seed=0)  # another process's model object: nothing in memory
    again.config._name_or_path = "tests/named-llama"
    assert hardware.step_costs(again) == measured
    unnamed = tiny_causal_lm("llama", seed=0)
    unnamed.config._name_or_path = ""
    assert hardware.curve_key(unnamed) is None  # random test models are measured per process


def merged_drafter(costs, prompt):
    drafter = MergedDrafter(costs, TokenRecycling(torch.zeros(50, 8, dtype=torch.long)),
                            LookaheadTrie(LookaheadConfig(decoding_length=8, branch_length=3)),
                            PromptLookup(num_tokens=3))
    drafter.start(prompt)
    return drafter


def test_merged_drafter_deduplicates_sources_into_one_trie():
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2]
    drafter = merged_drafter(FLAT, prompt)
    tree = drafter.propose(prompt)
    paths = {tuple(root_path(tree, node)[1:]) for node in range(1, len(tree))}
    assert len(paths) == len(tree) - 1  # no path appears twice
    assert (3, 9, 1) in paths and (3, 4) in paths  # prompt lookup's chain and the trie's other branch
    # the chain (3 9 1), found by two n-gram lengths and by the trie, is one path
    assert sum(1 for i in range(1, len(tree)) if tree.parents[i] == 0 and tree.tokens[i] == 3) == 1


def test_merged_drafter_cuts_the_tree_where_the_cost_curve_stops_paying():
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2]
    assert len(merged_drafter(STEEP, prompt).propose(prompt)) <= 3
    assert len(merged_drafter(FLAT, prompt).propose(prompt)) > 3
    linear = {1: 1.0, 128: 128.0}
    assert len(merged_drafter(linear, prompt).propose(prompt)) == 1


def test_merged_drafter_learns_acceptance_per_source():
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2]
    drafter = merged_drafter(FLAT, prompt)
    tree = drafter.propose(prompt)
    logits = torch.zeros(len(tree), 50)
    children = tree.children()
    chosen = children[0][3]
    logits[0, 3] = 5.0  # the model follows the 2-gram match 3 9 1 all the way
    logits[chosen, 9] = 5.0
    logits[children[chosen][9], 1] = 5.0
    fresh = merged_drafter(FLAT, prompt)
    drafter.update(tree, logits, [3, 9, 1, 0])
    assert drafter.rate(("pld", (2, 1), 1, 0)) > fresh.rate(("pld", (2, 1), 1, 0))
    assert drafter.rate(("pld", (2, 1), 3, 0)) > fresh.rate(("pld", (2, 1), 3, 0))
    # the empty matrix's token 0, offered beside the accepted 3, was rejected
    assert drafter.rate(("recycling", (0, 0), 1, 0)) < fresh.rate(("recycling", (0, 0), 1, 0))
    # the next tree is drafted knowing how far the last step got: part of the tree's depth, then all of it
    assert max(tree.depths) > 3 and drafter.last == PARTIAL
    chain = TokenTree.chain(0, [7])
    drafter.propose(prompt + [3, 9, 1, 0])
    drafter.update(chain, torch.zeros(2, 50), [7, 8])
    assert drafter.last == FULL
    drafter.propose(prompt + [3, 9, 1, 0, 7, 8])
    buckets = [drafter.buckets[b] for ids in drafter.sources for b in ids]
    assert buckets and all(b[-1] == FULL for b in buckets)


def test_merged_drafter_asks_for_fewer_candidates_where_the_curve_keeps_few():
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2]
    steep = merged_drafter(STEEP, prompt)
    assert len(steep.propose(prompt)) <= 3 and len(steep.recycler.active) == len(steep.recycler.template)
    for _ in range(60):  # the running mean of the kept size forgets the start (the whole template)
        steep.propose(prompt)
    assert len(steep.recycler.active) == OFFER_FLOOR
    assert steep.lookahead.config.decoding_length == 8  # the trie's own setting stays the cap
