"""Token Recycling with the step on the device (decoding/device_loop.py): the same tokens as plain greedy decoding,
its drafts really accepted, cut at end tokens and budgets, and the recycler left as the host path leaves it."""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.decoding.device_loop import BURST, RecyclingLoop, recycling_decode, supports
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.drafters.recycling_lookup import LOOKUP_TOKENS, RecyclingLookup
from pipelines.decoding.plain import DecodeStats, SamplingConfig
from pipelines.decoding.static import StaticForward
from pipelines.decoding.verify import speculative_decode
from pipelines.tiny import tiny_causal_lm
from tests.test_decoding import greedy, repetitive_prompt, run
from decoding_support import stop_inside_reference

BUCKETS = (1, 8, 16, 32, 64, 128)


def static(model, length: int = 512) -> StaticForward:
    return StaticForward(model, max_cache_len=length, buckets=BUCKETS, capture=False)


def recycler(model, nodes: int = 40) -> TokenRecycling:
    drafter = TokenRecycling(cold_matrix(model.config.vocab_size))
    drafter.resize(nodes)
    return drafter


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed,prompt_length,nodes", [(0, 5, 40), (2, 61, 80), (4, 1, 9), (6, 150, 24)])
def test_identical_to_plain_greedy_and_drafts_are_accepted(models, family, seed, prompt_length, nodes):
    model = models[family]
    prompt = repetitive_prompt(seed, prompt_length)
    reference = greedy(model, prompt, 60)
    drafter, stats = recycler(model, nodes), DecodeStats(top_logits=[])
    out = run(recycling_decode(static(model), drafter, prompt, 60, set(), stats=stats))
    assert out == reference
    assert stats.new_tokens == 60 and sum(stats.accepted_per_forward) == 60
    assert stats.forwards < 60 and max(stats.accepted_per_forward) > 1  # drafts were accepted: fewer forwards
    top = stats.top_two()
    assert len(top) == 60 and [pair[0][0] for pair in top] == reference  # each token's row ranks it first
    assert drafter.accepted[0] == drafter.offered[0] >= stats.forwards  # the root, every step run
    assert sum(drafter.accepted[1:]) >= 60 - stats.forwards


def test_same_tokens_and_steps_as_the_host_verifier_with_the_same_drafter(models):
    """The host verifier with the same template and a fresh matrix makes the same trees, so the same steps."""
    model = models["llama"]
    prompt = repetitive_prompt(1, 40)
    host_stats, device_stats = DecodeStats(), DecodeStats()
    host = run(speculative_decode(model, prompt, 50, SamplingConfig(), set(), recycler(model), stats=host_stats,
                                  forward=static(model)))
    device_recycler = recycler(model)
    device = run(recycling_decode(static(model), device_recycler, prompt, 50, set(), stats=device_stats))
    assert device == host
    assert device_stats.accepted_per_forward == host_stats.accepted_per_forward


def test_through_a_forward_that_embeds_prompt_tokens_too(models):
    """With trained PPD prompt tokens every method's forward embeds through their embedding (real ids: the model's
    own lookup), which the device loop's real ids go through unchanged."""
    model = models["llama"]
    prompt = repetitive_prompt(4, 30)
    forward = StaticForward(model, max_cache_len=512, buckets=BUCKETS, capture=False,
                            embed=model.get_input_embeddings())
    drafter = recycler(model)
    assert supports(drafter, forward, SamplingConfig(), None)
    assert run(recycling_decode(forward, drafter, prompt, 40, set())) == greedy(model, prompt, 40)


def test_stops_at_an_end_token_met_mid_run_and_at_the_budget(models):
    model = models["llama"]
    prompt = repetitive_prompt(3, 17)
    reference = greedy(model, prompt, 40)
    eos, expected = stop_inside_reference(reference)
    stats = DecodeStats()
    assert run(recycling_decode(static(model), recycler(model), prompt, 40, {eos}, stats=stats)) == expected
    assert stats.new_tokens == len(expected)
    for budget in (1, 2, BURST + 1):
        assert run(recycling_decode(static(model), recycler(model), prompt, budget, set())) == reference[:budget]


def test_later_requests_keep_the_warm_matrix_and_stay_identical(models):
    model = models["qwen2"]
    forward, drafter = static(model), recycler(model)
    for seed in (7, 8, 7):
        prompt = repetitive_prompt(seed, 30)
        assert run(recycling_decode(forward, drafter, prompt, 40, set())) == greedy(model, prompt, 40)
    assert not torch.equal(drafter.matrix, cold_matrix(model.config.vocab_size))


def test_a_cache_too_small_for_the_request_is_a_clear_error(models):
    model = models["llama"]
    with pytest.raises(ValueError, match="static cache holds"):
        run(recycling_decode(static(model, length=160), recycler(model, 80), repetitive_prompt(0, 20), 200, set()))


def test_only_greedy_unprocessed_recycling_on_the_static_step_runs_there(models):
    model = models["llama"]
    forward, drafter = static(model), recycler(model)
    assert supports(drafter, forward, SamplingConfig(), None)
    assert not supports(drafter, forward, SamplingConfig(temperature=0.7), None)
    assert not supports(drafter, forward, SamplingConfig(), ["repetition penalty"])
    assert not supports(drafter, None, SamplingConfig(), None)
    assert not supports(object(), forward, SamplingConfig(), None)


def test_the_device_lookup_finds_what_prompt_lookup_finds():
    """The vectorised n-gram search gives ``PromptLookup``'s chain (3-gram first, the latest occurrence) on contexts
    with and without repeats, including none found and continuations cut by the context's end."""
    rng = random.Random(0)
    forward = static(tiny_causal_lm("llama", seed=0).eval(), length=128)
    loop = RecyclingLoop(forward, recycler(forward.model, 9), lookup=LOOKUP_TOKENS)
    found_any = False
    for _ in range(200):
        context = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        finder = PromptLookup(num_tokens=LOOKUP_TOKENS)
        finder.start(context)
        matches = finder.matches(context)
        expected = matches[0][1] if matches else []
        loop.context[:len(context)] = torch.tensor(context)
        chain, length = loop.looked_up(torch.tensor(len(context)))
        assert chain[:int(length)].tolist() == expected, context
        found_any |= bool(expected)
    assert found_any


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("nodes", [1, 9, 30])
def test_recycling_with_a_lookup_chain_is_plain_greedy_and_its_chain_is_accepted(models, family, nodes):
    """With a root-only template every accepted draft is the chain's; larger templates compete with it."""
    model = models[family]
    prompt = repetitive_prompt(9, 80)
    expected = greedy(model, prompt, 80)
    stats = DecodeStats()
    drafter = RecyclingLookup(recycler(model, nodes))
    assert run(recycling_decode(static(model, 1024), drafter, prompt, 80, set(), stats=stats)) == expected
    host = run(speculative_decode(model, prompt, 80, SamplingConfig(), set(), RecyclingLookup(recycler(model, nodes)),
                                  forward=static(model, 1024)))
    assert host == expected
    assert stats.forwards < 80  # drafts accepted (with a root-only template, the chain's)
