"""The text tab on the GPU fast path's code (static cache, bucketed steps; uncaptured on the CPU)."""
from __future__ import annotations

import pytest

from pipelines.tabs.text import TextPipeline, TextRequest


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


def test_greedy_recycling_on_the_fast_path_runs_its_step_on_the_device(store, monkeypatch):
    from pipelines.decoding import device_loop

    loops = []
    decode = device_loop.RecyclingLoop.decode
    monkeypatch.setattr(device_loop.RecyclingLoop, "decode",
                        lambda loop, *args: loops.append(loop) or decode(loop, *args))
    monkeypatch.setenv("TOKENWORKS_TEXT_FAST", "1")
    pipeline = TextPipeline(store, "tiny")
    request = dict(prompt="the quick brown fox jumps over the lazy dog. the quick brown", max_new_tokens=24, seed=3)
    recycled = pipeline.run(TextRequest(**request, method="recycling"))
    assert len(loops) == 1 and recycled.stats["tau"] > 1.0
    vanilla = pipeline.run(TextRequest(**request, method="vanilla"))
    assert recycled.metadata["token_ids"] == vanilla.metadata["token_ids"]
    pipeline.run(TextRequest(**request, method="recycling", temperature=0.7))
    assert len(loops) == 1  # sampling takes the host verifier


def test_fast_path_is_off_on_the_cpu_by_default(store, monkeypatch):
    monkeypatch.delenv("TOKENWORKS_TEXT_FAST", raising=False)
    pipeline = TextPipeline(store, "tiny")
    pipeline.run(TextRequest(prompt="hello", max_new_tokens=3, seed=1))
    assert pipeline.load("").fast_forward is None


def test_compile_defaults_to_layers_only_where_graphs_are_captured(monkeypatch):
    import torch

    from pipelines.base import PipelineError
    from pipelines.decoding.serving import compile_mode

    monkeypatch.delenv("TOKENWORKS_TEXT_COMPILE", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert compile_mode(torch.device("cpu")) == "off"
    assert compile_mode(torch.device("cuda")) == "layers"
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


def test_layer_compile_runs_norms_and_mlps_compiled_inside_the_step_only(monkeypatch):
    """``compile="layers"``: each decoder layer's norms and MLP go through their compiled calls during the static
    step, its attention (which indexes the cache by layer number) does not, and the shared model is left with eager
    modules for its other callers (transformers ``generate``, exact mode)."""
    import torch

    from pipelines.decoding import static
    from pipelines.tiny import tiny_causal_lm

    compiled_calls = []

    def fake_compile(function, **options):
        def call(*args, **kwargs):
            compiled_calls.append(function.__self__)
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(static.torch, "compile", fake_compile)
    model = tiny_causal_lm()
    layers = static.decoder_layers(model)
    expected = [part for layer in layers for part in (layer.input_layernorm, layer.mlp, layer.post_attention_layernorm)]
    forward = static.StaticForward(model, max_cache_len=64, buckets=(1, 8), capture=False, compile="layers")
    assert forward.compile_mode == "layers"
    forward._stage([1, 2, 3], [0, 1, 2], torch.ones(3, 3, dtype=torch.bool).tril().numpy(), 0, 8)
    forward._replay(8, 64)  # the step as graphs capture it (uncaptured here: capture is off on the CPU)
    assert sorted(map(id, compiled_calls)) == sorted(map(id, expected))
    compiled_calls.clear()
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert compiled_calls == [] and all(part._compiled_call_impl is None for part in expected)


def test_layer_compile_traces_each_kind_of_part_once_for_every_layer_bucket_and_width(monkeypatch):
    """Dynamo (with its eager backend: same guards, no codegen) compiles the norm and the MLP once for one-row
    steps and once for the rest, whatever the layer, bucket or key width: nothing specialises on a layer number
    (whole layers did: their attention indexes the cache by it, one compile per layer past dynamo's limit of 8)."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from pipelines.decoding import static
    from pipelines.tiny import tiny_causal_lm

    compile_ = torch.compile
    monkeypatch.setattr(static.torch, "compile", lambda function, **options: compile_(function, backend="eager",
                                                                                      **options))
    torch._dynamo.reset()
    before = int(counters["stats"]["unique_graphs"])
    forward = static.StaticForward(tiny_causal_lm(), max_cache_len=128, buckets=(1, 8, 16), capture=False,
                                   compile="layers")
    for width in forward.widths:
        for size in (1, 8, 16):
            forward._stage([0] * size, list(range(size)), np.tril(np.ones((size, size), dtype=bool)), 0, size)
            forward._replay(size, width)
    assert int(counters["stats"]["unique_graphs"]) - before == 4
