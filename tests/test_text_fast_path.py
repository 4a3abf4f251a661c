"""The text tab on the GPU fast path's code (static cache, bucketed steps; uncaptured on the CPU)."""
from __future__ import annotations

import pytest

from pipelines.text import TextPipeline, TextRequest


@pytest.mark.parametrize("method", ["vanilla", "merged", "recycling", "lookahead", "prompt_lookup"])
def test_fast_path_gives_the_stock_path_token_ids(store, monkeypatch, method):
    pipeline = TextPipeline(store, "tiny")
    request = dict(prompt="the quick brown fox jumps over the lazy dog. the quick brown", max_new_tokens=24,
                   method=method, seed=3)
    monkeypatch.setenv("TOKENWORKS_TEXT_FAST", "0")
    stock = pipeline.run(TextRequest(**request))
    monkeypatch.setenv("TOKENWORKS_TEXT_FAST", "1")
    fast = pipeline.run(TextRequest(**request))
    assert fast.metadata["token_ids"] == stock.metadata["token_ids"]
    assert pipeline.load("").fast_forward is not None  # the adapter was built and kept with the model


def test_fast_path_is_off_on_the_cpu_by_default(store, monkeypatch):
    monkeypatch.delenv("TOKENWORKS_TEXT_FAST", raising=False)
    pipeline = TextPipeline(store, "tiny")
    pipeline.run(TextRequest(prompt="hello", max_new_tokens=3, seed=1))
    assert pipeline.load("").fast_forward is None
