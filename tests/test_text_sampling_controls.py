"""The text tab's sampling controls (top-k, repetition penalty, stop strings) go through the lossless verifier:
every method equals vanilla with the same settings and seed, and vanilla equals transformers' ``generate``."""
from __future__ import annotations

import pytest
import torch

from pipelines.base import PipelineError, Result
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.verify import speculative_decode
from pipelines.tabs.text import TextPipeline, TextRequest

from decoding_support import repetitive_prompt, run

PROMPT = "Once upon a time there was a small robot who liked to sing songs about the sea. Once upon a time"
MODEL = "tiny-llama (random weights)"
METHODS = ("merged", "prompt_lookup", "recycling", "lookahead")


@pytest.fixture
def pipeline(store):
    return TextPipeline(store, "tiny")


def result(pipeline, **kwargs) -> Result:
    request = TextRequest(prompt=PROMPT, model=MODEL, seed=3, max_new_tokens=32, **kwargs)
    return [e for e in pipeline.generate(request) if isinstance(e, Result)][0]


def generated(pipeline, **settings) -> list[int]:
    """``generate`` on the prompt the pipeline encodes, with the same settings."""
    lm = pipeline.load(MODEL)
    ids = pipeline.encode_prompt(lm, TextRequest(prompt=PROMPT, model=MODEL))
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, pad_token_id=0,
                            eos_token_id=1, **settings)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_repetition_penalty_equals_generate_for_every_method(pipeline):
    expected = generated(pipeline, do_sample=False, repetition_penalty=1.6)
    assert expected != generated(pipeline, do_sample=False)  # the penalty changes this output
    for method in ("vanilla", *METHODS):
        assert result(pipeline, method=method, repetition_penalty=1.6).metadata["token_ids"] == expected, method


def test_sampled_top_k_and_penalty_equal_generate_and_vanilla_with_the_same_seed(pipeline):
    settings = dict(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3)
    vanilla = result(pipeline, method="vanilla", **settings).metadata["token_ids"]
    torch.manual_seed(3)  # generate draws from the global generator, seeded as the request's
    assert vanilla == generated(pipeline, do_sample=True, temperature=0.9, top_k=4, top_p=0.95,
                                repetition_penalty=1.3)
    assert vanilla != result(pipeline, method="vanilla", **{**settings, "top_k": 0}).metadata["token_ids"]
    for method in METHODS:
        assert result(pipeline, method=method, **settings).metadata["token_ids"] == vanilla, method


def test_top_k_keeps_only_the_k_likeliest_tokens():
    from pipelines.tiny import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=0)
    prompt = repetitive_prompt(4, 12)
    config = SamplingConfig(temperature=5.0, top_k=1, seed=9)  # hot, but top-1: greedy
    greedy = run(plain_decode(model, prompt, 16, SamplingConfig(), set()))
    assert run(plain_decode(model, prompt, 16, config, set())) == greedy
    assert run(speculative_decode(model, prompt, 16, config, set(), PromptLookup(num_tokens=4))) == greedy


def stop_candidate(tokenizer, tokens: list[int], end: int) -> bool:
    """Whether the text of ``tokens[end - 2:end]`` is printable and first completed by token ``end``."""
    text = tokenizer.decode(tokens[end - 2:end])
    return bool(text.strip()) and "\ufffd" not in text and text not in tokenizer.decode(tokens[:end - 1])


def test_stop_strings_end_the_output_like_generate(pipeline):
    lm = pipeline.load(MODEL)
    full = result(pipeline, method="vanilla")
    tokens = full.metadata["token_ids"]
    end, stop = next((end, text) for end in range(6, 30) if stop_candidate(lm.tokenizer, tokens, end)
                     for text in [lm.tokenizer.decode(tokens[end - 2:end])])
    expected = generated(pipeline, do_sample=False, stop_strings=[stop], tokenizer=lm.tokenizer)
    assert expected == tokens[:end]
    for method in ("vanilla", *METHODS):
        out = result(pipeline, method=method, stop_strings=["never appears", stop])
        assert out.metadata["token_ids"] == expected, method
        assert out.value.endswith(stop) and out.value == full.value[:len(out.value)]
        assert out.stats["stopped_by"] == "stop string" and out.stats["stop_string"] == stop
        assert sum(len(r) for r in out.metadata["run_ids"]) == end
    assert full.stats["stopped_by"] == "max new tokens" and full.stats["stop_string"] == ""


@pytest.mark.parametrize("settings", [{"top_k": -1}, {"repetition_penalty": 0.0}, {"stop_strings": ["x" * 65]},
                                      {"stop_strings": ["a"] * 9}])
def test_out_of_range_controls_are_refused(pipeline, settings):
    with pytest.raises(PipelineError):
        result(pipeline, method="vanilla", **settings)
