"""Exact mode and the divergence report through the text pipeline and the tab's Compare headline."""
from __future__ import annotations

import pytest
import torch

from components.text_tab import compare_headline
from pipelines.base import Result
from pipelines.decoding.drafters.prompt_tokens import new_prompt_tokens
from pipelines.decoding.drafters.recurrent_drafter import new_head
from pipelines.decoding.compare import compare_stats
from pipelines.decoding.methods import METHODS
from pipelines.tabs.text import TextPipeline, TextRequest

PROMPT = "Once upon a time there was a small robot who liked to sing songs about the sea. Once upon a time"
MODEL = "tiny-llama (random weights)"


def result(pipeline, **kwargs) -> Result:
    return [e for e in pipeline.generate(TextRequest(prompt=PROMPT, seed=3, model=MODEL, **kwargs))
            if isinstance(e, Result)][0]


@pytest.fixture
def bf16_pipeline(store):
    pipeline = TextPipeline(store, "tiny")
    lm = pipeline.load(MODEL)
    lm.model.to(torch.bfloat16)
    lm.state.use(prompts=new_prompt_tokens(lm.model, seed=4))  # untrained: the mechanics, not the speed
    lm.state.use(head=new_head(lm.model))
    return pipeline


def test_exact_mode_every_method_identical_to_vanilla_in_bf16(bf16_pipeline):
    vanilla = result(bf16_pipeline, method="vanilla", max_new_tokens=16, exact=True)
    assert vanilla.stats["exact"] is True and vanilla.stats["dtype"] == "bfloat16"
    assert len(vanilla.metadata["top_logits"]) == len(vanilla.metadata["token_ids"])
    for method in METHODS[1:]:
        out = result(bf16_pipeline, method=method, max_new_tokens=16, exact=True)
        comparison = compare_stats(vanilla, out)
        assert comparison["identical"] and comparison["divergence"] is None, method
        assert comparison["exact"] is True
        assert "Output identical to vanilla** ✓ (exact mode)" in compare_headline(comparison)


def run_result(tokens: list[int], top: list, texts: list[str], method: str) -> Result:
    stats = {"method": method, "tokens_per_s": 10.0, "forwards": 4, "time_s": 0.4, "tau": 1.5, "draft_share": 0.1,
             "seed": 1, "device": "cuda", "dtype": "bfloat16", "exact": False}
    return Result("", stats, {"token_ids": tokens, "top_logits": top, "token_texts": texts})


def test_compare_names_the_first_divergence_and_its_near_tie():
    plain = run_result([5, 7, 9], [[(5, 3.0), (6, 1.0)], [(7, 17.25), (8, 17.125)], [(9, 1.0), (2, 0.5)]],
                       ["A", " cat", " sat"], "vanilla")
    drafted = run_result([5, 8, 4], [[(5, 3.0), (6, 1.0)], [(8, 17.25), (7, 17.125)], [(4, 1.0), (2, 0.5)]],
                         ["A", " dog", " ran"], "merged")
    comparison = compare_stats(plain, drafted)
    assert not comparison["identical"]
    found = comparison["divergence"]
    assert (found["index"], found["plain_text"], found["method_text"], found["near_tie"]) == (1, " cat", " dog", True)
    headline = compare_headline(comparison)
    assert ("diverged at token 1: plain chose ' cat' (logit 17.25), method chose ' dog' (logit 17.25) — bf16 "
            "rounding at a near-tie") in headline
    drafted.metadata["top_logits"][1] = [(8, 20.0), (3, 2.0)]  # no tie: the method's run ranked ' cat' nowhere
    assert "not a rounding near-tie" in compare_headline(compare_stats(plain, drafted))
