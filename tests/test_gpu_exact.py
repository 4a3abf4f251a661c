"""Exact mode on a CUDA device in bf16 (``pytest -m gpu``; skipped without one): the graph-captured fixed-shape
forward gives a token the same logits alone and deep in wide trees, and every drafter's greedy output equals
plain decoding's, on a model of SmolLM2-135M's shape whose LM head is full of near-ties. The stock static path's
divergences on the same drafts are printed (the default mode's bf16 near-tie flips), not asserted."""
from __future__ import annotations

import pytest
import torch

from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.exact import EXACT_ROWS, ExactForward
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.static import StaticForward
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import speculative_decode
from tests.decoding_support import FLAT
from tests.test_decoding import OracleDrafter, RandomTreeDrafter, repetitive_prompt, run
from tests.test_decoding_exact import near_tie_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3)
NEW = 48


@pytest.fixture(scope="module")
def model():
    return near_tie_model(device="cuda", **SMOLLM2_135M).to(torch.bfloat16)


def drafters(reference: list[int]) -> dict:
    zeros = torch.zeros(320, 8, dtype=torch.long, device="cuda")
    return {"prompt_lookup": PromptLookup(num_tokens=4), "oracle": OracleDrafter(reference),
            "random_tree_40": RandomTreeDrafter(seed=3, size=40), "recycling": TokenRecycling(zeros),
            "merged": new_merged(TokenRecycling(zeros.clone()), NGramTrie(1000), FLAT)}


@torch.inference_mode()
@pytest.mark.parametrize("features", [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)])
def test_a_fixed_shape_products_row_ignores_its_index_and_the_other_rows(features):
    """The assumption exact mode rests on, for each projection of SmolLM2-135M at M = EXACT_ROWS in bf16: a row's
    result is the same at any row index and whatever the other rows hold (a split-K or stream-K schedule that
    differed between the rows' tiles would break it)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(features[1], features[0], device="cuda", dtype=torch.bfloat16, generator=generator)
    rows = torch.randn(EXACT_ROWS, features[0], device="cuda", dtype=torch.bfloat16, generator=generator)
    reference = torch.nn.functional.linear(rows, weight)
    for shift in range(1, EXACT_ROWS):
        others = torch.randn_like(rows)
        others[shift] = rows[0]
        assert torch.equal(torch.nn.functional.linear(others, weight)[shift], reference[0]), shift


@torch.inference_mode()
@pytest.mark.parametrize("siblings", [0, 6, 30])
def test_a_token_alone_and_deep_in_a_tree_gets_the_same_logits(model, siblings):
    context = repetitive_prompt(4, 40)[0].tolist()
    forward = ExactForward(model, max_cache_len=512, capture=True)
    cache = forward.new_cache()
    forward(context + [40], torch.arange(41)[None], None, cache)
    alone = forward([41], torch.tensor([[41]]), None, cache)
    cache = forward.new_cache()
    forward(context, torch.arange(40)[None], None, cache)
    cache.crop(-1)
    tree = TokenTree([context[-1], *range(100, 100 + siblings), 40, 41], [-1, *[0] * siblings, 0, siblings + 1])
    pattern, positions = forward.block_inputs(tree, 0, 39)
    assert torch.equal(forward(tree.tokens, positions, pattern, cache)[-1], alone[0])
    assert forward.graphs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_mode_identical_to_plain_for_every_drafter_on_cuda_bf16(model, seed):
    prompt = repetitive_prompt(seed, 60).cuda()
    forward = ExactForward(model, max_cache_len=512, capture=True)
    reference = run(plain_decode(model, prompt, NEW, SamplingConfig(), set(), forward=forward))
    for name, drafter in drafters(reference).items():
        assert run(speculative_decode(model, prompt, NEW, SamplingConfig(), set(), drafter,
                                      forward=forward)) == reference, name
    assert forward.graphs and forward.capture  # captured, not the eager fallback
    static = StaticForward(model, max_cache_len=512, capture=True)
    stock = run(plain_decode(model, prompt, NEW, SamplingConfig(), set(), forward=static))
    for name, drafter in drafters(stock).items():
        out = run(speculative_decode(model, prompt, NEW, SamplingConfig(), set(), drafter, forward=static))
        print(f"seed {seed} {name}: stock static path {'identical' if out == stock else 'diverged'}")
