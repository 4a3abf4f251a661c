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


def test_compile_defaults_to_dynamic_only_where_graphs_are_captured(monkeypatch):
    import torch

    from pipelines.base import PipelineError
    from pipelines.text import compile_mode

    monkeypatch.delenv("TOKENWORKS_TEXT_COMPILE", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert compile_mode(torch.device("cpu")) == "off"
    assert compile_mode(torch.device("cuda")) == "dynamic"
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    assert compile_mode(torch.device("cuda")) == "off"  # no torch.compile under ZeroGPU
    monkeypatch.setenv("TOKENWORKS_TEXT_COMPILE", "0")
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert compile_mode(torch.device("cuda")) == "off"
    monkeypatch.setenv("TOKENWORKS_TEXT_COMPILE", "fast")
    with pytest.raises(PipelineError, match="TOKENWORKS_TEXT_COMPILE"):
        compile_mode(torch.device("cuda"))


def test_static_forward_rejects_an_unknown_compile_mode(store):
    from pipelines.decoding.static import StaticForward

    model = TextPipeline(store, "tiny").load("").model
    with pytest.raises(ValueError, match="compile"):
        StaticForward(model, max_cache_len=64, compile="yes")
