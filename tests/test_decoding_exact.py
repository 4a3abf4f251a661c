"""Exact mode (decoding/exact.py) and the divergence report (decoding/divergence.py), in bf16 on tiny models.

The near-tie model's LM head has every odd row a copy of the even row before it plus noise of 1e-3, so at most
positions the two best tokens are within bf16 rounding of each other: the stock path, whose tree nodes attend at
other cache slots than plain decoding, flips some of them; exact mode must flip none."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pipelines.decoding.divergence import first_divergence
from pipelines.decoding.exact import ExactForward
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import speculative_decode
from pipelines.tiny import tiny_causal_lm
from tests.test_decoding import OracleDrafter, drafters_for, repetitive_prompt, run

NEW = 24


TINY_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def near_tie_model(seed: int = 0, device: str = "cpu", **shape) -> torch.nn.Module:
    """A random Llama (``shape``: config fields, TINY_SHAPE by default) whose LM head makes near-ties, in bf16."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, max_position_embeddings=2048, eos_token_id=1, pad_token_id=0,
                         bos_token_id=None, tie_word_embeddings=False, **(shape or TINY_SHAPE))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[1::2] = weight[0::2] + 1e-3 * torch.randn_like(weight[0::2])
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def tied():
    return near_tie_model()


def exact(model) -> ExactForward:
    return ExactForward(model, max_cache_len=512, rows=8, block=128, capture=False)


def decode_both(model, prompt, drafter_for, forward=None) -> tuple[list[int], list[int], DecodeStats, DecodeStats]:
    """Plain and drafted greedy ids through ``forward`` (stock cache when None), with their top-2 logits."""
    plain_stats, drafted_stats = DecodeStats(top_logits=[]), DecodeStats(top_logits=[])
    plain = run(plain_decode(model, prompt, NEW, SamplingConfig(), set(), stats=plain_stats, forward=forward))
    drafted = run(speculative_decode(model, prompt, NEW, SamplingConfig(), set(), drafter_for(plain),
                                     stats=drafted_stats, forward=forward))
    return plain, drafted, plain_stats, drafted_stats


def test_stock_bf16_trees_flip_near_ties_that_exact_mode_keeps(tied):
    """The case that makes the exactness tests able to fail: the same drafts diverge on the stock path."""
    stock_diverged = 0
    for seed in range(3):
        prompt = repetitive_prompt(seed, 24)
        plain, drafted, _, _ = decode_both(tied, prompt, OracleDrafter)
        stock_diverged += plain != drafted
        plain, drafted, _, _ = decode_both(tied, prompt, OracleDrafter, exact(tied))
        assert drafted == plain, seed
    assert stock_diverged >= 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exact_mode_identical_to_plain_for_every_drafter_in_bf16(tied, family):
    """Every kind of tree (24-node random trees over two 16-row forwards, recycling and merged trees, tries, chains),
    and Gemma 3's sliding window applied at logical positions."""
    model = tied if family == "llama" else tiny_causal_lm(family, seed=0).to(torch.bfloat16)
    prompt = repetitive_prompt(1, 23)
    forward = ExactForward(model, max_cache_len=256, rows=16, block=128, capture=False)
    reference = run(plain_decode(model, prompt, NEW, SamplingConfig(), set(), forward=forward))
    drafters = drafters_for(model, "llama", reference)
    for name in ("recycling_small_tree", "lookahead", "prompt_lookup", "merged_steep_cost", "random_tree", "oracle"):
        drafter = drafters[name]
        out = run(speculative_decode(model, prompt, NEW, SamplingConfig(), set(), drafter, forward=forward))
        assert out == reference, name


@torch.inference_mode()
def test_a_rows_logits_and_cache_entries_do_not_depend_on_the_step(tied):
    """A token decoded alone and the same token deep in a wide tree (after six siblings, so at another slot and
    in another row) give the same logits bit for bit, and the K/V of the path equal plain decoding's."""
    context = repetitive_prompt(4, 20)[0].tolist()
    forward = exact(tied)
    cache = forward.new_cache()
    forward(context + [40], torch.arange(21)[None], None, cache)
    alone = forward([41], torch.tensor([[21]]), None, cache)
    plain_keys = forward.cache.layers[-1].keys[0, :, :22].clone()
    cache = forward.new_cache()
    forward(context, torch.arange(20)[None], None, cache)
    tree = TokenTree([context[-1], 10, 11, 12, 13, 14, 15, 40, 41], [-1, 0, 0, 0, 0, 0, 0, 0, 7])
    pattern, positions = forward.block_inputs(tree, 0, 19)
    cache.crop(-1)  # the root is re-fed as the block's first row
    nodes = forward(tree.tokens, positions, pattern, cache)
    assert torch.equal(nodes[8], alone[0])
    tree_keys = forward.cache.layers[-1].keys[0]
    assert torch.equal(tree_keys[:, :20], plain_keys[:, :20])
    assert torch.equal(tree_keys[:, 19 + 7], plain_keys[:, 20])  # node 7 (token 40, position 20) at slot 26


def test_long_prompts_go_in_several_blocks_and_trees_must_fit(tied):
    prompt = repetitive_prompt(2, 300)  # longer than the 128-row block: its leading chain is fed first
    forward = exact(tied)
    reference = run(plain_decode(tied, prompt, 8, SamplingConfig(), set(), forward=forward))
    assert reference == run(plain_decode(tied, prompt, 8, SamplingConfig(), set(),
                                         forward=ExactForward(tied, max_cache_len=512, rows=16, block=32,
                                                              capture=False)))
    with pytest.raises(ValueError, match="causal chain"):
        wide = TokenTree([5] + [6] * 140, [-1] + [0] * 140)
        pattern, positions = forward.block_inputs(wide, 0, 0)
        forward(wide.tokens, positions, pattern, forward.new_cache())


def test_the_divergence_report_names_the_flipped_near_tie(tied):
    """A real divergence on the stock path: the report's token and logits are the runs' own, and it is a tie."""
    for seed in range(3):
        plain, drafted, plain_stats, drafted_stats = decode_both(tied, repetitive_prompt(seed, 24), OracleDrafter)
        if plain != drafted:
            break
    else:
        pytest.fail("no stock divergence to report")
    found = first_divergence(plain, drafted, plain_stats.top_two(), drafted_stats.top_two())
    k = found.index
    assert plain[:k] == drafted[:k] and (found.plain_token, found.method_token) == (plain[k], drafted[k])
    assert found.plain_logit == plain_stats.top_two()[k][0][1]  # greedy: each run's choice is its best logit
    assert found.method_logit == drafted_stats.top_two()[k][0][1]
    assert found.near_tie and found.plain_logit_of_method_token is not None
    assert first_divergence(plain, plain, plain_stats.top_two(), plain_stats.top_two()) is None


def test_a_divergence_far_from_a_tie_is_not_called_rounding():
    top = [[(7, 12.0), (3, 4.0)], [(9, 2.0), (8, 1.0)]]
    other = [[(7, 12.0), (3, 4.0)], [(5, 9.0), (9, 1.0)]]
    found = first_divergence([7, 9], [7, 5], top, other)
    assert (found.index, found.plain_token, found.method_token) == (1, 9, 5)
    assert found.plain_logit_of_method_token is None and not found.near_tie
    assert first_divergence([7], [7, 9], top, other) is None  # one run only longer: no differing token


def test_top_two_of_the_chosen_rows_ranking_only_up_to_the_last_one():
    """Each step keeps the top-2 of the rows its committed tokens were chosen at (root, then the accepted nodes,
    anywhere in the tree), read back in one transfer at the end; ranking every verified row cost a CPU ~3.6 ms a
    step."""
    generator = torch.Generator().manual_seed(0)
    steps = [(torch.randn(12, 50, generator=generator).bfloat16(), [0, 2, 7]),
             (torch.randn(1, 50, generator=generator), None),
             (torch.randn(9, 50, generator=generator).bfloat16(), [0, 1])]
    stats = DecodeStats(top_logits=[])
    for logits, rows in steps:
        stats.keep_top(logits, rows)
    expected = []
    for logits, rows in steps:
        for row in range(len(logits)) if rows is None else rows:
            values, ids = logits[row].float().sort(descending=True)
            expected.append([(int(ids[0]), float(values[0])), (int(ids[1]), float(values[1]))])
    assert stats.top_two() == expected
    # the rows after the last chosen one: unranked
    assert [len(values) for values, _, _ in stats.top_logits] == [8, 1, 2]
