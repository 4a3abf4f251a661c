"""Text decoding on a CUDA device (``pytest -m gpu``; skipped without one): the captured steps (the verify forward
and the ReDrafter head's levels) give the tokens of the same code run eagerly, device acceptance equals the host
walk there, and after one warm-up no method or bucket makes inductor compile again."""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.decoding.device_accept import greedy_accept
from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, RecurrentDrafting
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.static import StaticForward
from pipelines.decoding.verify import accept, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import FLAT, random_head, repetitive_prompt, run
from test_decoding import RandomTreeDrafter
from test_decoding_device import peaked_logits, random_tree

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BUCKETS = (1, 8, 16, 32, 64, 128)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", seed=0).cuda().eval()


def drafters(model) -> dict:
    """Every drafter kind, trees from 1 to 128 nodes (so every bucket is used)."""
    matrix = cold_matrix(320, "cuda")
    return {
        "recycling": TokenRecycling(matrix.clone()),
        "lookahead": LookaheadTrie(LookaheadConfig(decoding_length=16, branch_length=4)),
        "prompt_lookup": PromptLookup(num_tokens=6),
        "merged": new_merged(TokenRecycling(matrix.clone()), NGramTrie(1000), FLAT),
        "merged_head": new_merged(TokenRecycling(matrix.clone()), NGramTrie(1000), FLAT,
                                  drafts=HeadDrafts(random_head(model), model)),
        "redrafter": RecurrentDrafting(random_head(model), model, FLAT),
        "random_100": RandomTreeDrafter(3, 100),
    }


def decode_all(model, forward, prompt) -> dict[str, list[int]]:
    out = {"vanilla": run(plain_decode(model, prompt, 40, SamplingConfig(), set(), forward=forward))}
    for name, drafter in drafters(model).items():
        out[name] = run(speculative_decode(model, prompt, 40, SamplingConfig(), set(), drafter, forward=forward))
    return out


def test_captured_steps_give_the_eager_static_paths_tokens(model):
    prompt = repetitive_prompt(2, 40).cuda()
    captured = StaticForward(model, max_cache_len=512, buckets=BUCKETS, capture=True)
    eager = StaticForward(model, max_cache_len=512, buckets=BUCKETS, capture=False)
    got, expected = decode_all(model, captured, prompt), decode_all(model, eager, prompt)
    # every (bucket, key width) captured on the first step
    assert set(captured.graphs) == {(size, width) for width in captured.widths for size in BUCKETS if size <= width}
    assert got == expected
    assert all(ids == expected["vanilla"] for ids in expected.values())  # fp32: lossless


def test_the_heads_captured_levels_equal_its_eager_levels(model):
    drafts = HeadDrafts(random_head(model), model)
    eager = HeadDrafts(drafts.head, model)
    eager.calls.capture = False
    assert drafts.calls.capture
    for step in range(3):
        drafts.anchor = eager.anchor = torch.randn(model.config.hidden_size, device="cuda")
        for offer in (8, 64, 81):
            got, expected = drafts.candidates(5 + step, offer), eager.candidates(5 + step, offer)
            assert (got[0].tokens, got[0].parents, got[1:]) == (expected[0].tokens, expected[0].parents, expected[1:])
    assert len(drafts.calls.graphs) == 3  # one graph per offer size, replayed on later steps


def test_one_read_acceptance_equals_the_host_walk_on_the_gpu():
    rng = random.Random(0)
    for _ in range(50):
        tree = random_tree(rng, rng.randrange(1, 100), vocab=4)
        logits = peaked_logits(rng, tree, vocab=4).cuda()
        assert greedy_accept(tree, logits) == accept(tree, logits, SamplingConfig(), None)


@pytest.mark.parametrize("compile", ["layers", "dynamic"])
def test_no_recompiles_across_methods_and_buckets_after_warm_up(model, compile):
    from torch._dynamo.utils import counters

    from benchmarks.text_served import guard_failures

    forward = StaticForward(model, max_cache_len=1024, buckets=BUCKETS, capture=True, compile=compile)
    decode_all(model, forward, repetitive_prompt(3, 30).cuda())  # warm-up: compiles and captures
    before = int(counters["stats"]["unique_graphs"])
    for seed, length in ((4, 7), (5, 90), (6, 200)):  # prompts in other buckets, other tree sizes
        decode_all(model, forward, repetitive_prompt(seed, length).cuda())
    assert int(counters["stats"]["unique_graphs"]) == before, guard_failures()


def test_recycling_graphs_read_the_current_matrix():
    matrix = torch.randint(0, 320, (320, 8), device="cuda")
    probs = torch.rand(320, 8, device="cuda")
    captured, eager = TokenRecycling(matrix, probs=probs), TokenRecycling(matrix, probs=probs)
    eager.calls.capture = False
    for nodes in (81, 12, 81):
        captured.resize(nodes)
        eager.resize(nodes)
        for root in (3, 5):
            matrix[root] = torch.randperm(320, device="cuda")[:8]  # updated in place, as update() does
            got, expected = captured.scored([root]), eager.scored([root])
            assert (got[0].tokens, got[1]) == (expected[0].tokens, expected[1])
    assert set(captured.calls.graphs) == {81, 12}


@pytest.mark.parametrize("compile", ["off", "layers"])
@pytest.mark.parametrize("lookup", [False, True])
def test_the_device_loops_captured_steps_give_plain_greedy_tokens(model, compile, lookup):
    """The device loop (Token Recycling, with or without its lookup chain): one graph per key width, replayed in
    bursts; fp32, so identical to plain greedy decoding; later requests reuse the graphs (no recompiles) and the
    warm matrix."""
    from torch._dynamo.utils import counters

    from pipelines.decoding.device_loop import recycling_decode
    from pipelines.decoding.drafters.recycling_lookup import RecyclingLookup
    from pipelines.decoding.plain import DecodeStats

    forward = StaticForward(model, max_cache_len=1024, buckets=BUCKETS, capture=True, compile=compile)
    eager = StaticForward(model, max_cache_len=1024, buckets=BUCKETS, capture=False)
    recycler = TokenRecycling(cold_matrix(320, "cuda"))
    recycler.resize(54 if lookup else 64)
    drafter = RecyclingLookup(recycler) if lookup else recycler
    for request, (seed, length) in enumerate(((2, 40), (5, 300), (2, 40))):
        prompt = repetitive_prompt(seed, length).cuda()
        expected = run(plain_decode(model, prompt, 120, SamplingConfig(), set(), forward=eager))
        stats = DecodeStats(top_logits=[])
        assert run(recycling_decode(forward, drafter, prompt, 120, set(), stats=stats)) == expected
        assert stats.forwards < 120 and [pair[0][0] for pair in stats.top_two()] == expected
        if request == 0:
            compiled = int(counters["stats"]["unique_graphs"])
    assert int(counters["stats"]["unique_graphs"]) == compiled
    (loop,) = forward.loops.values()
    assert set(loop.calls.graphs) <= set(forward.widths)
