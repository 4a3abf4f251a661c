"""The image and video fast paths on a CUDA device (``pytest -m gpu``; skipped without one): the captured graph
gives the same pixels as the same static path run eagerly, for every control and merging, binding included (its
refinement's forward and backward passes captured too), replays on the next request without capturing again, and
the stored bf16 components stay bf16 on the GPU."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from pipelines.models import ModelStore, placement
from pipelines.tabs.image import ImagePipeline, ImageRequest
from pipelines.tabs.video import VideoPipeline, VideoRequest

from test_fast_path import pixels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TINY = {"sd15": "tiny-sd15 (random weights)", "sdxl": "tiny-sdxl (random weights)"}
COMPASS = json.dumps([{"name": "car", "angle": 90, "box": [0.5, 0.0, 1.0, 1.0]}])
CONTROLS = {"plain": {}, "lpa": dict(lpa=True, lpa_window=(0.0, 600.0)), "compass": dict(compass=COMPASS),
            "leakfix": dict(isolate="table"), "merge": dict(merge_ratio=0.5), "binding": dict(binding=True),
            "heatmap": dict(heatmap_words="car"), "lpa+compass+merge": dict(lpa=True, compass=COMPASS, merge_ratio=0.5)}


@pytest.fixture(scope="module")
def image_pipeline():
    return ImagePipeline(ModelStore(packaged={}, dtype=torch.bfloat16), "tiny")


def run(pipeline: ImagePipeline, arch: str, backend: str, monkeypatch, **controls):
    monkeypatch.setenv("TOKENWORKS_FAST_BACKEND", backend)
    prompt = "a [red car] by a table in watercolor style"
    return pipeline.run(ImageRequest(prompt=prompt, model=TINY[arch], steps=4, seed=7, width=64, height=64,
                                     **controls))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("control", list(CONTROLS))
def test_captured_graph_equals_the_eager_static_path(image_pipeline, arch, control, monkeypatch):
    stored = image_pipeline.load(TINY[arch]).pipe
    before = placement(stored)
    eager = run(image_pipeline, arch, "eager", monkeypatch, **CONTROLS[control])
    graph = run(image_pipeline, arch, "graph", monkeypatch, **CONTROLS[control])
    again = run(image_pipeline, arch, "graph", monkeypatch, **CONTROLS[control])
    assert graph.stats["fast"] == "graph"
    assert graph.stats["graph_replays"] > 0 or control == "heatmap"  # recording steps run eagerly (fast.py)
    assert np.array_equal(pixels(graph.value), pixels(eager.value))
    assert np.array_equal(pixels(again.value), pixels(graph.value)) and again.stats["capture_s"] == 0
    assert graph.stats["biased_attention_calls"] == eager.stats["biased_attention_calls"]
    assert graph.stats["tokens_merged"] == eager.stats["tokens_merged"]
    assert placement(stored) == before and all(d == torch.bfloat16 for pairs in before.values()
                                               for _, d in pairs if d.is_floating_point)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_binding_refinement_replays_captured_forward_and_backward(image_pipeline, arch, monkeypatch):
    """ToMe's refinement (anchor calls, token loss with its gradient, entropy loss with its gradients) replays
    graphs captured with their backward: a repeated request captures nothing, runs no UNet call eagerly, replays
    one graph per refinement pass besides the denoising steps, and gives the eager static path's pixels."""
    eager = run(image_pipeline, arch, "eager", monkeypatch, binding=True)
    run(image_pipeline, arch, "graph", monkeypatch, binding=True)
    again = run(image_pipeline, arch, "graph", monkeypatch, binding=True)
    forwards = again.stats["binding_unet_forwards"]
    assert forwards == eager.stats["binding_unet_forwards"] > 0
    assert again.stats["capture_s"] == 0 and again.stats["eager_unet_calls"] == 0
    assert again.stats["graph_replays"] >= 4 + forwards
    assert again.stats["binding_entropy_trace"] == eager.stats["binding_entropy_trace"]
    assert np.array_equal(pixels(again.value), pixels(eager.value))


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None,
                    reason="the video tab encodes MP4 with imageio-ffmpeg (requirements.txt); this machine lacks it")
def test_video_graph_equals_eager_static_path_and_keeps_dtype(monkeypatch):
    video = VideoPipeline(ModelStore(packaged={}, dtype=torch.bfloat16), "tiny")
    before = placement(video.load(video.specs[0].name))
    settings = dict(prompt="a red car by a table in watercolor style", width=64, height=64, steps=3, fps=4, seed=3,
                    num_frames=8, context_length=8, lpa=True, merge_ratio=0.5, lpa_window=(0.0, 700.0))
    monkeypatch.setenv("TOKENWORKS_FAST_BACKEND", "eager")
    eager = video.run(VideoRequest(**settings))
    monkeypatch.setenv("TOKENWORKS_FAST_BACKEND", "graph")
    graph = video.run(VideoRequest(**settings))
    assert graph.stats["fast"] == "graph" and graph.stats["graph_replays"] > 0
    assert np.array_equal(graph.value.frames, eager.value.frames)
    assert placement(video.load(video.specs[0].name)) == before


def test_previews_never_wait_for_the_gpu(image_pipeline):
    """A preview is a few kernels and an async copy: no host sync (a host-side colour map made every preview wait
    for all queued steps)."""
    from pipelines.diffusion.preview import AsyncPreviews

    model = image_pipeline.load(TINY["sd15"])
    previews = AsyncPreviews(model.preview_map, upscale=8, interval=0.0)
    latents = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")
    try:
        previews.add(latents)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert previews.ready()[0].size == (512, 512)
