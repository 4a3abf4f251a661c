"""The fast denoising path (pipelines/diffusion/fast.py) on tiny models, CPU: capture is off here, so these tests run
the same static code path the CUDA graph captures (static inputs, hooks on static buffers, gated static biases)
and check that it gives the eager output and makes the eager controls' step/timestep choices exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.diffusion import fast
from pipelines.diffusion.attention import AttentionControl, KeyBias, KeyShare, cross_attention_layers
from pipelines.diffusion.fast import FastUNet, StaticBiases, choose_backend, unet_graphs
from pipelines.diffusion.lpa import route_style_tokens
from pipelines.diffusion.merging import apply_merging, merging_stats, remove_merging
from pipelines.models import ModelStore
from pipelines.tabs.image import ImagePipeline, ImageRequest
from pipelines.tabs.video import VideoPipeline, VideoRequest
from pipelines.tiny import tiny_sd15_pipeline

TINY = {"sd15": "tiny-sd15 (random weights)", "sdxl": "tiny-sdxl (random weights)"}
COMPASS = json.dumps([{"name": "car", "angle": 90, "box": [0.5, 0.0, 1.0, 1.0]}])
# Tolerance where the fast path differs from eager by construction: on steps outside a control's window the
# eager processor falls back to stock SDPA without a mask, the static one adds an all-zero bias (same maths).
PIXEL_TOLERANCE = 1


@pytest.fixture(scope="module")
def image_pipeline():
    return ImagePipeline(ModelStore(packaged={}), "tiny")


def pixels(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")).astype(int) for p in paths])


def test_backend_fallbacks(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("TOKENWORKS_FAST_BACKEND", raising=False)
    unet = tiny_sd15_pipeline().unet
    assert choose_backend("cpu", True, unet) == "eager"  # CPU: the static path, no capture
    assert choose_backend("cuda", True, unet) == "graph"
    assert choose_backend("cuda", False, unet) == "off"
    assert choose_backend("cuda", True, torch.nn.Linear(2, 2)) == "off"  # unsupported model: stock call
    monkeypatch.setenv("TOKENWORKS_FAST_BACKEND", "eager")
    assert choose_backend("cuda", True, unet) == "eager"
    monkeypatch.setenv("TOKENWORKS_FAST_BACKEND", "compile")  # no longer a backend: unknown values mean graph
    assert choose_backend("cuda", True, unet) == "graph"
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert choose_backend("cuda", True, unet) == "eager"  # ZeroGPU: no capture


def test_graph_backend_on_cpu_tensors_runs_eager_and_keeps_the_output():
    pipe = tiny_sd15_pipeline()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = pipe.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
        with FastUNet(pipe.unet, "graph") as fast:
            out = pipe.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
    assert fast.backend == "eager" and fast.eager_calls == 1 and torch.equal(out, stock)
    assert "forward" not in vars(pipe.unet)  # the instance forward is removed on exit


@pytest.mark.parametrize("arch,controls", [
    ("sd15", {}),
    ("sdxl", {}),
    ("sd15", {"lpa": True, "lpa_window": (0.0, 600.0)}),
    ("sdxl", {"lpa": True, "lpa_window": (0.0, 600.0)}),
    ("sd15", {"compass": COMPASS}),
    ("sd15", {"isolate": "table"}),
    ("sd15", {"binding": True}),
    ("sd15", {"heatmap_words": "car"}),
])
def test_fast_path_output_equals_eager(image_pipeline, arch, controls):
    prompt = ("a [red car] by a table in watercolor style" if controls.get("binding")
              else "a red car by a table in watercolor style")
    settings = dict(prompt=prompt, model=TINY[arch], steps=4, seed=7, **controls)
    eager = image_pipeline.run(ImageRequest(**settings, fast=False))
    fast = image_pipeline.run(ImageRequest(**settings))
    assert fast.stats["fast"] == "eager" and eager.stats["fast"] == "off"
    assert fast.stats["eager_unet_calls"] >= 4 and eager.stats["eager_unet_calls"] == 0
    assert np.abs(pixels(fast.value) - pixels(eager.value)).max() <= PIXEL_TOLERANCE
    assert fast.stats["biased_attention_calls"] == eager.stats["biased_attention_calls"]
    if controls.get("lpa") or controls.get("compass"):
        assert fast.stats["biased_attention_calls"] > 0


def test_merging_through_the_fast_path_equals_eager():
    pipe = tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run(fast: bool) -> tuple[np.ndarray, int]:
        apply_merging(pipe.unet, 0.5, min_tokens=0, seed=3)
        wrapper = FastUNet(pipe.unet, "eager" if fast else "off")
        try:
            with wrapper:
                images = pipe("a red car", num_inference_steps=3, height=32, width=32, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
            return images, merging_stats(pipe.unet)["tokens_merged"]
        finally:
            remove_merging(pipe.unet)

    (stock, stock_merged), (fast, fast_merged) = run(False), run(True)
    assert stock_merged > 0 and fast_merged == stock_merged
    assert np.array_equal(stock, fast)


def run_loop(pipe, control: AttentionControl, backend: str, steps: int = 5) -> tuple[np.ndarray, list]:
    """A stock diffusers loop with the control installed, through FastUNet(backend)."""
    fast = FastUNet(pipe.unet, backend, control, lambda: pipe.scheduler.timesteps)

    def on_step_end(p, i, t, kwargs):
        control.step = fast.step = i + 1
        return {}

    with control, fast:
        images = pipe("a red car by a table", num_inference_steps=steps, height=32, width=32, output_type="np",
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end).images
    return images, [(a.step, a.timestep, a.layer, a.label, a.tokens, a.queries) for a in control.applied]


def gated_control(unet, tokens: list[int], region_rows: int = 4) -> AttentionControl:
    control = AttentionControl(unet)
    region = torch.zeros(8, 8)
    region[:region_rows] = 1
    control.biases.extend(route_style_tokens(control.layers, tokens[:2], tokens[2:], None))  # LPA t in [300, 650]
    control.biases.append(KeyBias(tokens=[tokens[0]], value=-2.0, region=region, steps={0, 3}, rows="all",
                                  label="region, steps 0 and 3"))
    return control


def test_static_gates_reproduce_eager_step_and_timestep_selection():
    pipe = tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    eager_images, eager_applied = run_loop(pipe, gated_control(pipe.unet, [2, 3, 5]), "off")
    fast_images, fast_applied = run_loop(pipe, gated_control(pipe.unet, [2, 3, 5]), "eager")
    assert fast_applied == eager_applied
    steps = {step for step, *_ in eager_applied}
    assert steps and steps != set(range(len(pipe.scheduler.timesteps)))  # the gates switch on and off
    assert np.abs(fast_images - eager_images).max() <= 1e-5


def test_static_bias_equals_eager_bias_at_every_step():
    unet = tiny_sd15_pipeline().unet
    control = gated_control(unet, [2, 3, 5])
    control.latent_hw = (8, 8)
    static = StaticBiases(control)
    for step, timestep in [(0, 900.0), (1, 640.0), (3, 300.0), (4, 100.0)]:
        control.step, control.timestep = step, timestep
        static.set_gates(static.decide(step, timestep), torch.device("cpu"))
        for name in static.layers:
            eager = control.build_bias(name, 2, 16, 77, torch.device("cpu"), torch.float32)
            fast = static.bias(name, 2, 16, 77, torch.device("cpu"), torch.float32)
            expected = torch.zeros_like(fast) if eager is None else eager
            assert torch.equal(fast, expected), (name, step)


def test_static_key_shares_equal_eager_and_build_their_counts_once(image_pipeline, monkeypatch):
    """Compass's key shares on the fast path give the eager keys bit for bit, from counts built once per layer and
    cache entry: not in every UNet call (on a GPU a zero fill and two kernels per share, layer and replay), and
    not again for the next request served by the same entry."""
    unet = tiny_sd15_pipeline().unet
    control = AttentionControl(unet)
    control.key_shares += [KeyShare(target=3, source=4), KeyShare(target=6, source=7),
                           KeyShare(target=9, source=5, rows="all")]
    static = StaticBiases(control)
    key = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0))
    for name in control.layers:
        eager = control.share_keys(name, key)
        with control.static_biases(static):
            assert torch.equal(control.share_keys(name, key), eager) and not torch.equal(eager, key)
            assert torch.equal(control.share_keys(name, key), eager)

    built: list[str] = []
    count_shares = AttentionControl.share_counts

    def spy(self: AttentionControl, name: str, *args: object) -> dict:
        built.append(name)
        return count_shares(self, name, *args)

    monkeypatch.setattr(AttentionControl, "share_counts", spy)
    request = dict(prompt="a red car by a table", model=TINY["sd15"], steps=3, seed=1, width=32, height=32,
                   compass=COMPASS)
    unet_graphs(image_pipeline.load(TINY["sd15"]).pipe.unet).entries.clear()
    first = image_pipeline.run(ImageRequest(**request))
    layers = cross_attention_layers(image_pipeline.load(TINY["sd15"]).pipe.unet)
    assert first.stats["eager_unet_calls"] >= 3 and sorted(built) == sorted(layers)
    built.clear()
    image_pipeline.run(ImageRequest(**request))
    assert built == []


def test_cached_entry_is_refilled_with_the_next_requests_masks():
    """A graph captured in one request replays in the next: the masks it reads must be the new request's."""
    pipe = tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    run_loop(pipe, gated_control(pipe.unet, [2, 3, 5]), "eager")
    entries = len(unet_graphs(pipe.unet).entries)
    second_fast, second_applied = run_loop(pipe, gated_control(pipe.unet, [4, 6, 7], region_rows=2), "eager")
    assert len(unet_graphs(pipe.unet).entries) == entries  # same structure: the cached entry was reused
    second_eager, eager_applied = run_loop(pipe, gated_control(pipe.unet, [4, 6, 7], region_rows=2), "off")
    assert second_applied == eager_applied
    assert np.abs(second_fast - second_eager).max() <= 1e-5


def test_video_fast_path_equals_eager_with_shot_controls():
    video = VideoPipeline(ModelStore(packaged={}), "tiny")
    shots = json.dumps([{"start": 0, "prompt": "a pool by a table"},
                        {"start": 4, "prompt": "a castle in watercolor style", "transition": "cut"}])
    settings = dict(width=32, height=32, steps=3, fps=4, seed=3, num_frames=8, context_length=8, shots=shots,
                    lpa=True, isolate="pool", lpa_window=(0.0, 700.0))
    eager = video.run(VideoRequest(**settings, fast=False))
    fast = video.run(VideoRequest(**settings))
    assert fast.stats["fast"] == "eager" and fast.stats["eager_unet_calls"] == 3
    assert fast.stats["biased_attention_calls"] == eager.stats["biased_attention_calls"] > 0
    assert np.abs(fast.value.frames - eager.value.frames).max() <= 1e-4


def test_switching_between_controls_and_sizes_reuses_every_graph():
    """A user alternating between the tab's control configurations at two sizes gets every graph from the cache
    the second time round: an eviction would mean a fresh capture (on an H100, 0.06-0.8 s per request; with 8
    graphs per UNet the served benchmark's nine configurations recaptured on every call)."""
    pipeline = ImagePipeline(ModelStore(packaged={}), "tiny")
    configs = [{}, dict(merge_ratio=0.5), dict(lpa=True), dict(compass=COMPASS), dict(isolate="red car"),
               dict(lpa=True, compass=COMPASS, merge_ratio=0.5)]

    def round_of_requests() -> set[int]:
        for size in (32, 48):
            for controls in configs:
                pipeline.run(ImageRequest(prompt="a red car by a table in watercolor style", model=TINY["sd15"],
                                          steps=2, seed=1, width=size, height=size, **controls))
        unet = pipeline.load(TINY["sd15"]).pipe.unet
        return {id(entry) for entry in unet_graphs(unet).entries.values()}

    first = round_of_requests()
    assert len(first) >= 2 * len(configs) - 2  # merging may share a key with its plain size; the rest differ
    assert round_of_requests() == first


def test_graph_cache_misses_count_the_entries_a_request_builds(image_pipeline, monkeypatch):
    """``graph_cache_misses`` is the number of entries a request had to build (on a GPU each is a capture, ~0.1 s
    at SD1.5 512 px): none when a request finds its graph; one per request when two configurations take turns in a
    cache with room for one (as the served benchmark's nine configurations did in 8 entries at 26f4781). The
    leakage fix changes only the prompt embeddings, so it is served by the plain request's graph."""
    def misses(**controls: object) -> int:
        return image_pipeline.run(ImageRequest(prompt="a red car by a table in watercolor style", model=TINY["sd15"],
                                               steps=2, seed=1, width=32, height=32, **controls)
                                  ).stats["graph_cache_misses"]

    unet_graphs(image_pipeline.load(TINY["sd15"]).pipe.unet).entries.clear()
    assert [misses(), misses(), misses(isolate="red car")] == [1, 0, 0]
    monkeypatch.setattr(fast, "MAX_CACHED", 1)
    assert [misses(lpa=True), misses(), misses(lpa=True), misses(lpa=True)] == [1, 1, 1, 0]
