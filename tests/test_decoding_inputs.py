"""The verifier's inputs: processors see the real prompt, the cache is cropped only when rows are dropped,
cold Token Recycling rows draft distinct siblings."""
from __future__ import annotations

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from pipelines.decoding.plain import SamplingConfig
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.state import DecodingState
from pipelines.decoding.verify import CausalLMForward, NoDraft, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import repetitive_prompt, run


def test_repetition_penalty_through_the_verifier_equals_generate():
    model = tiny_causal_lm("llama", seed=0)
    base = repetitive_prompt(3, 30)
    # the prompt already holds what the model would say next: only a penalty that reads it changes the output
    prompt = model.generate(base, attention_mask=torch.ones_like(base), max_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                              repetition_penalty=1.8, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8)])
    for drafter in (NoDraft(), PromptLookup(num_tokens=4)):
        out = run(speculative_decode(model, prompt, 20, SamplingConfig(), set(), drafter, processors=processors))
        assert out == expected, type(drafter).__name__


class CropRecorder(CausalLMForward):
    """A forward whose caches record every crop they are asked for."""

    def new_cache(self):
        cache = super().new_cache()
        crop, self.crops = cache.crop, []

        def recorded(count: int) -> None:
            self.crops.append(count)
            crop(count)

        cache.crop = recorded
        return cache


def test_cache_is_cropped_only_when_there_is_something_to_drop():
    model = tiny_causal_lm("llama", seed=0)
    forward = CropRecorder(model)
    run(speculative_decode(model, repetitive_prompt(1, 30), 12, SamplingConfig(), set(), NoDraft(), forward=forward))
    assert 0 not in forward.crops


def test_cold_recycling_rows_draft_distinct_siblings():
    tree = DecodingState(tiny_causal_lm("llama", seed=5)).recycler().propose([7, 11])
    for parent in range(len(tree)):
        siblings = [tree.tokens[i] for i in range(len(tree)) if tree.parents[i] == parent]
        assert len(siblings) == len(set(siblings)), (parent, siblings)
