"""The static fast path (padded buckets, index rollback) decodes exactly what the dynamic-cache path does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.static import StaticForward, StaticTreeCache, capture_supported
from pipelines.decoding.tree import TokenTree, block_position_ids, block_visibility
from pipelines.decoding.verify import speculative_decode
from tests.test_decoding import OracleDrafter, RandomTreeDrafter, drafters_for, greedy, repetitive_prompt, run
from decoding_support import assert_identical_to_greedy, stop_inside_reference

FAMILIES = ("llama", "qwen2")
BUCKETS = (1, 8, 16, 32)  # small buckets so trees of 3..30 nodes get padded and the 24-node tree spans two


def static(model, **options) -> StaticForward:
    return StaticForward(model, max_cache_len=256, buckets=BUCKETS, capture=False, **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_through_the_static_path_is_identical(models, family):
    model = models[family]
    prompt = repetitive_prompt(0, 23)
    reference = greedy(model, prompt, 30)
    forward = static(model)
    assert run(plain_decode(model, prompt, 30, SamplingConfig(), set(), forward=forward)) == reference
    assert forward.cache.get_seq_length() == 23 + 29  # the last token is never fed
    sampled = SamplingConfig(temperature=0.8, top_p=0.9, seed=3)
    assert (run(plain_decode(model, prompt, 30, sampled, set(), forward=forward))
            == run(plain_decode(model, prompt, 30, sampled, set())))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed,prompt_length", [(0, 5), (2, 61)])
def test_every_drafter_identical_through_the_static_path(models, family, seed, prompt_length):
    model = models[family]
    prompt = repetitive_prompt(seed, prompt_length)
    reference = greedy(model, prompt, 30)
    assert_identical_to_greedy(model, prompt, lambda: drafters_for(model, family, reference), forward=static(model))


@pytest.mark.parametrize("size", [2, 7, 9, 16, 17, 30])
def test_tree_sizes_around_bucket_edges(models, size):
    model = models["llama"]
    prompt = repetitive_prompt(5, 19)
    reference = greedy(model, prompt, 25)
    forward = static(model)
    out = run(speculative_decode(model, prompt, 25, SamplingConfig(), set(), RandomTreeDrafter(size, size),
                                 forward=forward))
    assert out == reference


def test_eos_mid_tree_and_sampling(models):
    model = models["llama"]
    prompt = repetitive_prompt(3, 17)
    reference = greedy(model, prompt, 40)
    eos, expected = stop_inside_reference(reference)
    chunks = list(speculative_decode(model, prompt, 40, SamplingConfig(), {eos}, OracleDrafter(reference),
                                     forward=static(model)))
    assert [t for c in chunks for t in c] == expected and len(chunks[-1]) > 1
    sampled = SamplingConfig(temperature=1.0, seed=11)
    assert (run(speculative_decode(model, prompt, 30, sampled, set(), RandomTreeDrafter(1, 12), forward=static(model)))
            == run(plain_decode(model, prompt, 30, sampled, set())))


def test_rollback_moves_the_write_position_and_hides_stale_rows(models):
    """After a tree step the cache length counts only the kept rows; the next block overwrites the rest, and
    a step after a rollback sees exactly what a fresh cache holding the committed tokens would."""
    model = models["llama"]
    forward = static(model)
    prompt = repetitive_prompt(6, 10)[0].tolist()
    cache = forward.new_cache()
    mask, positions = forward.block_inputs(TokenTree([prompt[-1]], [-1]), len(prompt) - 1, 0)
    forward(prompt, positions, mask, cache, keep=1)
    assert cache.get_seq_length() == 10
    tree = TokenTree([7, 8, 9, 10, 11], [-1, 0, 0, 1, 3])
    mask, positions = forward.block_inputs(tree, 0, 10)
    assert positions == [10, 11, 11, 12, 13]
    forward(tree.tokens, positions, mask, cache)
    assert cache.get_seq_length() == 15
    cache.crop(-3)  # keep the root and node 1
    assert cache.get_seq_length() == 12
    with pytest.raises(ValueError):
        cache.crop(2)
    step = [3, 4]
    mask, positions = forward.block_inputs(TokenTree([4], [-1]), 1, 12)
    assert positions == [12, 13]
    after_rollback = forward(step, positions, mask, cache)
    assert cache.get_seq_length() == 14

    fresh = static(model)
    committed = prompt + [7, 8] + step
    mask, positions = fresh.block_inputs(TokenTree([committed[-1]], [-1]), len(committed) - 1, 0)
    expected = fresh(committed, positions, mask, fresh.new_cache(), keep=2)
    torch.testing.assert_close(after_rollback, expected, rtol=1e-5, atol=1e-5)


def test_oversize_block_runs_unpadded_and_full_cache_raises(models):
    model = models["llama"]
    forward = StaticForward(model, max_cache_len=64, buckets=(1, 8), capture=False)
    prompt = repetitive_prompt(7, 40)
    assert run(plain_decode(model, prompt, 6, SamplingConfig(), set(), forward=forward)) == greedy(model, prompt, 6)
    with pytest.raises(ValueError, match="static cache holds 64"):
        run(plain_decode(model, repetitive_prompt(7, 60), 10, SamplingConfig(), set(), forward=forward))


def test_capture_selection_and_failed_capture_falls_back_to_eager(models, monkeypatch):
    assert not capture_supported(torch.device("cpu"))
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert capture_supported(torch.device("cuda"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not capture_supported(torch.device("cuda"))
    model = models["llama"]
    assert StaticForward(model, max_cache_len=64).capture is False  # CPU: eager
    forward = StaticForward(model, max_cache_len=128, buckets=BUCKETS, capture=True)  # forced on a CPU: fails
    prompt = repetitive_prompt(8, 15)
    out = run(speculative_decode(model, prompt, 20, SamplingConfig(), set(), RandomTreeDrafter(2, 9), forward=forward))
    assert out == greedy(model, prompt, 20)
    assert forward.capture is False and not forward.graphs
    assert isinstance(forward.new_cache(), StaticTreeCache) and forward.new_cache() is forward.cache


def test_gpu_step_benchmark_runs_tiny_on_cpu():
    from benchmarks.text_gpu_step import main

    result = main(["--tiny"])
    assert result["benchmark"] == "text_gpu_step" and result["settings"]["copy_bandwidth_tb_s"] > 0
    measured = {(row["method"], row["query_tokens"]) for row in result["rows"] if "ms" in row}
    assert measured == {(method, n) for method in ("eager", "static") for n in (1, 8, 16)}
    assert all(row["floor_ms"] > 0 and row["ratio_to_plain"] > 0 for row in result["rows"])


def test_a_step_attends_over_the_narrowest_width_and_matches_the_full_cache(models):
    """Widths are powers of two from the largest bucket, then the whole cache; a step's logits over its narrow
    width equal those over every cache row (the rows past the block are masked either way), and the layers are
    handed K/V of exactly that width."""
    model = models["llama"]
    narrow, full = static(model), static(model)
    full.widths = (full.max_cache_len,)
    assert narrow.widths == (32, 64, 128, 256)
    assert [narrow.width(past, 8) for past in (0, 24, 25, 120, 248)] == [32, 32, 64, 128, 256]
    widths_seen = []
    update = type(narrow.cache.layers[0]).update

    def recording(layer, *args, **kwargs):
        keys, values = update(layer, *args, **kwargs)
        widths_seen.append(keys.shape[-2])
        return keys, values

    prompt = repetitive_prompt(6, 40)[0].tolist()
    tree = TokenTree([7, 8, 9, 10, 11], [-1, 0, 0, 1, 3])
    results = []
    for forward in (narrow, full):
        cache = forward.new_cache()
        forward(prompt, list(range(40)), None, cache)  # 40 rows: bucket 64 (over its own width: 64)
        mask, positions = forward.block_inputs(tree, 0, 40)
        widths_seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(cache.layers[0]), "update", recording)
            results.append(forward(tree.tokens, positions, mask, cache))
        assert set(widths_seen) == {64 if forward is narrow else 256}  # 40 committed + bucket 8 -> 64
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_the_whole_step_compile_keeps_one_key_width(models):
    """``dynamic`` traces every (bucket, width) graph: with all widths it did not finish compiling in 6 minutes on an
    H100, so it attends over the whole cache only; the other modes keep the narrow widths."""
    assert static(models["llama"], compile="dynamic").widths == (256,)
    assert static(models["llama"]).widths == (32, 64, 128, 256)


class GradWatch(OracleDrafter):
    """Notes the grad mode each update of the decode loop runs under."""

    def __init__(self, reference: list[int]) -> None:
        super().__init__(reference)
        self.grad_modes: list[bool] = []

    def update(self, tree, logits, accepted):
        self.grad_modes.append(torch.is_grad_enabled())


def test_decoding_records_no_autograd_graph_and_leaves_the_callers_grad_mode(models):
    """With grad on, a forward over weights that require grad records its autograd graph and the static cache's
    in-place K/V writes chained every step's graph to the next: a served CPU run held every step's activations
    (11 GB after three requests of SmolLM2-135M)."""
    model = models["llama"]
    assert any(parameter.requires_grad for parameter in model.parameters())  # what recorded the graph
    prompt = repetitive_prompt(1, 21)
    reference = greedy(model, prompt, 20)
    forward, drafter = static(model), GradWatch(reference)
    runs = []
    for chunk in speculative_decode(model, prompt, 20, SamplingConfig(), set(), drafter, forward=forward):
        assert torch.is_grad_enabled()  # the caller's mode between the loop's steps
        runs.extend(chunk)
    assert runs == reference and drafter.grad_modes and not any(drafter.grad_modes)
    assert not any(layer.keys.requires_grad or layer.values.requires_grad for layer in forward.cache.layers)


@pytest.mark.parametrize("before_root", [0, 1, 5])
def test_block_inputs_are_the_full_constructions_block(models, before_root):
    """The static step's pattern is the block part of the verifier's full visibility (every row sees the cached
    prefix; the re-fed chain is causal; tree nodes see the chain and their ancestors), built piece by piece."""
    forward = static(models["llama"])
    tree = TokenTree([4, 9, 8, 7, 9, 3, 2], [-1, 0, 0, 1, 1, 3, 2])
    allowed, positions = forward.block_inputs(tree, before_root, 11)
    reference = block_visibility(tree, before_root, 11)
    assert allowed.dtype == np.bool_ and allowed.shape == reference[:, 11:].shape
    assert np.array_equal(allowed, reference[:, 11:]) and reference[:, :11].all()
    assert positions == block_position_ids(tree, before_root, 11, torch.device("cpu"))[0].tolist()
    allowed[:] = False  # the caller's own copy: the next step's pattern is unchanged
    assert np.array_equal(forward.block_inputs(tree, before_root, 11)[0], reference[:, 11:])
