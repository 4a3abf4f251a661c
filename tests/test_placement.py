"""A request never changes the device or dtype of a stored model's components (bf16 store, every control)."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.base import PipelineError
from pipelines.models import ModelStore, keep_placement, placement
from pipelines.tabs.image import ImagePipeline, ImageRequest
from pipelines.tabs.video import VideoPipeline, VideoRequest

PROMPT = "a [red hat] and a [blue car] in watercolor style"
TINY = {"sd15": "tiny-sd15 (random weights)", "sdxl": "tiny-sdxl (random weights)"}
COMPASS = json.dumps([{"name": "car", "angle": 90, "box": [0.5, 0.0, 1.0, 1.0]}])
CONTROLS = {
    "plain": {},
    "lpa": dict(lpa=True),
    "binding": dict(binding=True),
    "leakfix": dict(isolate="red hat"),
    "merge": dict(merge_ratio=0.5),
    "compass": dict(compass=COMPASS, prompt="a [red hat] and a [blue car]"),
    "heatmap+compare": dict(lpa=True, heatmap_words="hat", compare="controls off"),
    "stock call": dict(fast=False, scheduler="Euler a"),
}


@pytest.fixture(scope="module")
def bf16_images():
    return ImagePipeline(ModelStore(packaged={}, dtype=torch.bfloat16), "tiny")


def dtypes(value) -> set[torch.dtype]:
    return {dtype for pairs in placement(value).values() for _, dtype in pairs if dtype.is_floating_point}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("control", list(CONTROLS))
def test_image_request_keeps_the_stored_dtype_and_device(bf16_images, arch, control):
    stored = bf16_images.load(TINY[arch]).pipe
    before = placement(stored)
    assert dtypes(stored) == {torch.bfloat16}
    settings = {"prompt": PROMPT, **CONTROLS[control]}
    bf16_images.run(ImageRequest(model=TINY[arch], steps=2, seed=5, **settings))
    assert placement(stored) == before


def test_video_request_keeps_the_stored_dtype_and_device():
    video = VideoPipeline(ModelStore(packaged={}, dtype=torch.bfloat16), "tiny")
    stored = video.load(video.specs[0].name)
    before = placement(stored)
    assert dtypes(stored) == {torch.bfloat16}
    video.run(VideoRequest(prompt="a [red hat] and a [blue car]", width=32, height=32, steps=2, num_frames=8,
                           context_length=8, fps=4, seed=3, binding=True, lpa=False, merge_ratio=0.5,
                           compare="merging off"))
    assert placement(stored) == before


def test_guard_names_the_component_a_request_recast():
    stored = ImagePipeline(ModelStore(packaged={}, dtype=torch.bfloat16), "tiny").load(TINY["sd15"]).pipe
    with pytest.raises(PipelineError, match="changed the device or dtype of tiny's unet"):
        with keep_placement(stored, "tiny"):
            stored.unet.to(torch.float32)


def test_previews_are_throttled_and_capped_in_size():
    from pipelines.diffusion.preview import AsyncPreviews

    previews = AsyncPreviews(torch.randn(5, 3), upscale=8, interval=60.0, side=512)
    previews.add(torch.randn(1, 4, 128, 128))
    previews.add(torch.randn(1, 4, 128, 128))  # inside the interval: skipped
    images = previews.ready()
    assert len(previews.pending) == 0 and images[0].size == (512, 512)
    assert previews.ready() is None
