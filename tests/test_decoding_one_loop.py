"""One plain loop and one tree-size rule (issue #24 item 2).

Plain decoding is the verifier's loop with ``NoDraft``: it must still produce the ids, forwards and top-2 rows that
the separate plain loop produced (``data/plain_reference.json``, recorded from that loop before it was removed:
four tiny families, greedy and sampled, stock cache and static adapter, with and without repetition penalty). Every
drafter that sizes its tree does it by ``hardware.pick_tree_size`` on its own path probabilities."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from pipelines.decoding.drafters import merged as merged_module
from pipelines.decoding.hardware import (GPU_STEP_COST, REFED_ROWS, StepPrices, bucketed, interpolate, pick_tree_size,
                                         step_cost)
from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_tokens import Guesses, PromptChains
from pipelines.decoding.drafters.recurrent_drafter import RecurrentDrafting, new_head
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.sliding import UnsupportedAttention
from pipelines.decoding.static import StaticForward
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import speculative_decode, StockForward
from pipelines.tiny import tiny_causal_lm

from decoding_support import STEEP, repetitive_prompt, run

REFERENCE = json.loads((Path(__file__).parent / "data" / "plain_reference.json").read_text())
CONFIGS = {"greedy": SamplingConfig(), "sampled": SamplingConfig(temperature=0.8, top_p=0.9, top_k=40, seed=3),
           "hot": SamplingConfig(temperature=1.5, seed=11)}
H100 = bucketed({1: 2.2947, 8: 2.5352, 16: 2.5835, 32: 2.6375, 64: 2.6851, 128: 2.8014}, (1, 8, 16, 32, 64, 128))


@pytest.fixture(scope="module")
def models():
    return {family: tiny_causal_lm(family, seed=0) for family in ("llama", "qwen2", "gpt2", "gemma3")}


def decode(model, key: str, eos: set[int], stats: DecodeStats | None = None) -> list[int]:
    _, name, adapter, penalty = key.split("/")
    penalty = float(penalty.removeprefix("penalty"))
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)]) if penalty != 1.0 else None
    forward = StaticForward(model, max_cache_len=256, buckets=(1, 8), capture=False) if adapter == "static" else None
    prompt = torch.tensor([REFERENCE[key]["prompt"]])
    return run(plain_decode(model, prompt, 40, CONFIGS[name], eos, stats=stats, forward=forward, processors=processors))


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_plain_decoding_reproduces_the_old_plain_loop(models, key):
    stats = DecodeStats(top_logits=[])
    ids = decode(models[key.split("/")[0]], key, {7}, stats)
    recorded = REFERENCE[key]
    assert ids == recorded["ids"]
    assert stats.forwards == recorded["forwards"] == stats.new_tokens and stats.accepted_per_forward == [1] * 40
    assert [[i for i, _ in pair] for pair in stats.top_two()] == recorded["top_two_ids"]


@pytest.mark.parametrize("key", ["llama/greedy/stock/penalty1.0", "gemma3/sampled/static/penalty1.3"])
def test_plain_decoding_stops_at_eos_where_the_old_loop_would(models, key):
    recorded = REFERENCE[key]["ids"]
    eos = recorded[17]
    assert decode(models[key.split("/")[0]], key, {eos}) == recorded[:recorded.index(eos) + 1]


def test_plain_decoding_takes_layouts_a_tree_cannot_go_through(models, monkeypatch):
    """No rollback, no tree: plain decoding never asks for the layout the tree verifier needs (chunked or linear
    layers raise there), and a sliding model keeps transformers' own windowed cache."""
    from pipelines.decoding import verify

    def refuse(model):
        raise UnsupportedAttention("linear_attention layers")

    monkeypatch.setattr(verify, "attention_layout", refuse)
    model = models["llama"]
    assert len(run(plain_decode(model, repetitive_prompt(0, 5), 4, SamplingConfig(), set()))) == 4
    with pytest.raises(UnsupportedAttention):
        verify.CausalLMForward(model)
    assert StockForward(models["gemma3"]).new_cache().layers[0].__class__.__name__ == "DynamicSlidingWindowLayer"


def test_the_rule_prices_re_fed_rows_with_the_tree():
    """On a bucketed curve a tree that fills bucket 8 alone spills into 16 with the re-fed row: the rule keeps
    8 - REFED_ROWS nodes, where pricing the tree alone kept 8 (and ``StaticForward.fit`` then cut it)."""
    curve = bucketed({1: 1.0, 8: 1.1, 16: 1.5}, (1, 8, 16))
    rates = [1.0] + [0.12] * 7 + [0.1] + [0.0] * 7
    assert REFED_ROWS == 1 and pick_tree_size(rates, curve) == 7
    alone = max(range(1, 17), key=lambda n: (sum(rates[:n]) / interpolate(curve, n), -n))
    assert alone == 8


def test_redrafter_sizes_its_tree_by_the_rule(models, monkeypatch):
    model = models["llama"]
    drafter = RecurrentDrafting(new_head(model), model, GPU_STEP_COST)
    path = [1.0, 0.7, 0.5, 0.3, 0.2] + [0.15] * 20 + [0.01] * 39
    tree = TokenTree(list(range(64)), [-1] + [i // 2 for i in range(63)])
    monkeypatch.setattr(drafter.drafts, "launch", lambda root, max_nodes: torch.zeros(1))  # stands for a grown tree
    monkeypatch.setattr(drafter.drafts, "read", lambda grown: (tree, [0] * 64, path, path))
    for costs in (GPU_STEP_COST, STEEP, H100):
        drafter.costs = costs
        assert len(drafter.propose([3, 4, 5])) == pick_tree_size(path, costs)


@pytest.mark.parametrize("costs", [GPU_STEP_COST, STEEP, H100], ids=["h200", "steep", "h100"])
def test_merged_drafter_sizes_its_tree_by_the_rule(models, monkeypatch, costs):
    chosen = []

    def spy(path, curve, prices=None, host_s=0.0):
        size = pick_tree_size(path, curve, host_s=host_s)  # the rule itself, from the probabilities alone
        chosen.append(size)
        assert pick_tree_size(path, curve, prices, host_s) == size and curve is costs
        return size

    monkeypatch.setattr(merged_module, "pick_tree_size", spy)
    drafter = new_merged(TokenRecycling(torch.randint(0, 320, (320, 8), generator=torch.Generator().manual_seed(0))),
                         NGramTrie(1000), costs)
    proposed, propose = [], drafter.propose
    drafter.propose = lambda context: proposed.append(propose(context)) or proposed[-1]
    run(speculative_decode(models["llama"], repetitive_prompt(3, 60), 30, SamplingConfig(), set(), drafter))
    assert [len(tree) for tree in proposed] == chosen and len(chosen) > 1


def test_ppd_without_room_for_chains_is_the_rule():
    """``PromptChains.sized`` adds chain candidates to the rule's; with no room for a chain it is the rule."""
    chains = PromptChains.__new__(PromptChains)
    chains.ids, chains.gain, chains.prices = [1000, 1001, 1002], 1.0, StepPrices()
    guesses = Guesses([[10 + 10 * d + r for r in range(6)] for d in range(3)], [[0.6, 0.2, 0.1, 0.05, 0.03, 0.02]] * 3)
    tree, _, path = guesses.tree(0, 40)
    for costs in (GPU_STEP_COST, STEEP, H100):
        assert chains.sized(tree, path, costs, max_nodes=3) == pick_tree_size(path, costs)


def test_step_prices_are_the_rules_prices_remembered_per_curve():
    """Drafters price sizes from a list kept per curve (``StepPrices``): the same floats ``step_cost`` gives, so
    every tree is sized as before; a new curve or a larger size prices again."""
    prices = StepPrices()
    for costs in (GPU_STEP_COST, STEEP, H100):
        listed = prices(costs, 40)
        assert listed[1:41] == [step_cost(costs, n) for n in range(1, 41)]
        assert prices(costs, 12) is listed
    assert len(prices(H100, 200)) > 200 and prices(H100, 200)[200] == step_cost(H100, 200)
