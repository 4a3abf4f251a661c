"""Video pipeline on the tiny AnimateDiff: stock equivalence, timeline conditioning at the hook, MP4, Stop."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from pipelines.base import CancelToken, Progress, Result
from pipelines.diffusion.timeline import parse_shots
from pipelines.tabs.video import VideoPipeline, VideoRequest
from pipelines.tiny import tiny_animatediff_pipeline

SMALL = dict(width=32, height=32, steps=2, guidance_scale=7.5, fps=4, seed=7)


@pytest.fixture(scope="module")
def video():
    from pipelines.models import ModelStore

    return VideoPipeline(ModelStore(packaged={}), "tiny")


class RecordContext(AttnProcessor2_0):
    """Stock SDPA cross-attention that keeps the text context each frame received."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        self.contexts.append(encoder_hidden_states.detach().clone())
        return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)


def spatial_cross_attention(pipe):
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


def run(video, **fields) -> Result:
    return video.run(VideoRequest(**{**SMALL, **fields}))


def test_single_prompt_is_bit_identical_to_stock_animatediff(video):
    result = run(video, prompt="a red hat", negative_prompt="blurry", num_frames=6)
    stock = tiny_animatediff_pipeline()
    stock.set_progress_bar_config(disable=True)
    expected = stock(prompt="a red hat", negative_prompt="blurry", num_frames=6, height=32, width=32,
                     num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(7),
                     output_type="np").frames[0]
    assert np.array_equal(result.value.frames, expected)
    assert result.stats["free_noise"] is False and result.stats["seed"] == 7


def test_mp4_decodes_to_requested_frames_with_sidecar_and_strip(video):
    import imageio
    from PIL import Image

    result = run(video, prompt="a blue car", num_frames=9)
    with imageio.get_reader(result.value.video, format="FFMPEG") as reader:
        frames = [frame for frame in reader]
        assert reader.get_meta_data()["codec"] == "h264"
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    sidecar = json.loads(open(result.value.video + ".json").read())
    assert sidecar["seed"] == 7 and sidecar["num_frames"] == 9 and sidecar["shots"][0]["prompt"] == "a blue car"
    assert Image.open(result.value.strip).size == (32 * 8, 32)
    stats = result.stats  # the request's seconds split into denoising, decoding and writing the files
    assert stats["denoise_s"] > 0 and stats["decode_s"] > 0 and stats["export_s"] > 0
    assert abs(stats["denoise_s"] + stats["decode_s"] - stats["time_s"]) <= 0.002


def test_mp4_pixels_are_the_stock_pil_pixels():
    from diffusers.image_processor import VaeImageProcessor

    from pipelines.outputs import to_uint8

    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 1, size=(3, 8, 8, 3)).astype(np.float32)
    frames[0, 0, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255]  # ties
    stock = np.stack([np.asarray(image) for image in VaeImageProcessor.numpy_to_pil(frames)])
    assert np.array_equal(to_uint8(frames), stock)
    assert to_uint8(np.array([[[[-0.2, 1.3, 0.5]]]], dtype=np.float32)).tolist() == [[[[0, 255, 128]]]]


def record_contexts(video, **fields) -> tuple[torch.Tensor, Result]:
    """The text context of every frame at the first UNet call (CFG batch: [negative frames, positive frames])."""
    layer = spatial_cross_attention(video.load(""))
    recorder = RecordContext()
    stock_processor = layer.processor
    layer.set_processor(recorder)
    try:
        result = run(video, **fields)
    finally:
        layer.set_processor(stock_processor)
    return recorder.contexts[0], result


def per_frame_contexts(video, shots: str, num_frames: int) -> tuple[torch.Tensor, object]:
    context, _ = record_contexts(video, shots=shots, num_frames=num_frames, smooth_window=4, context_length=8, steps=1)
    assert context.shape[0] == 2 * num_frames
    return context, video.load("")


def shot_encodings(pipe, timeline) -> torch.Tensor:
    return torch.cat([pipe.encode_prompt(shot.prompt, pipe.device, 1, False)[0] for shot in timeline.shots])


def test_cut_conditioning_is_a_step_function_at_the_cross_attention(video):
    shots = '[{"start": 0, "prompt": "a red hat"}, {"start": 5, "prompt": "a blue car", "transition": "cut"}]'
    context, pipe = per_frame_contexts(video, shots, 10)
    positive = context[10:]
    encodings = shot_encodings(pipe, parse_shots(shots))
    for frame in range(10):
        own = 0 if frame < 5 else 1
        assert torch.equal(positive[frame], positive[0 if own == 0 else 5]), frame
        torch.testing.assert_close(positive[frame], encodings[own], rtol=0, atol=1e-5)
    assert not torch.allclose(positive[4], positive[5])
    assert all(torch.equal(context[frame], context[0]) for frame in range(10))  # one negative prompt


def test_smooth_conditioning_interpolates_across_the_window(video):
    shots = ('[{"start": 0, "prompt": "a red hat"}, {"start": 6, "prompt": "a blue car", "transition": "smooth"},'
             ' {"start": 10, "prompt": "a castle", "transition": "cut"}]')
    timeline = parse_shots(shots, smooth_window=4)
    context, pipe = per_frame_contexts(video, shots, 12)
    encodings = shot_encodings(pipe, timeline)
    mix = timeline.frame_mix(12)
    assert mix[5] == pytest.approx({0: 0.75, 1: 0.25}) and mix[6] == pytest.approx({0: 0.5, 1: 0.5})
    for frame, weights in enumerate(mix):
        expected = sum(weight * encodings[shot] for shot, weight in weights.items())
        torch.testing.assert_close(context[12 + frame], expected, rtol=0, atol=1e-5)


def test_cut_shots_confine_text_to_their_frames(video):
    """Changing one shot's prompt changes the text context of that shot's frames and of no other frame."""
    first = ('[{"start": 0, "prompt": "a red hat"}, {"start": 4, "prompt": "a blue car"}, '
             '{"start": 8, "prompt": "a dog"}]')
    second = first.replace("a blue car", "a castle in watercolor style")
    context_a, _ = per_frame_contexts(video, first, 12)
    context_b, _ = per_frame_contexts(video, second, 12)
    changed = [frame for frame in range(12) if not torch.equal(context_a[12 + frame], context_b[12 + frame])]
    assert changed == [4, 5, 6, 7]


def test_long_video_runs_through_sliding_context_windows(video):
    result = run(video, prompt="a red hat", num_frames=20, context_length=8, context_stride=4, steps=1)
    assert result.value.frames.shape[0] == 20 and result.stats["free_noise"] is True
    pipe = video.load("")
    assert type(pipe.unet.down_blocks[0].motion_modules[0].transformer_blocks[0]).__name__ == "BasicTransformerBlock"


def test_progress_per_step_and_stop_ends_within_a_step(video):
    events = list(video.generate(VideoRequest(**{**SMALL, "prompt": "a red hat", "num_frames": 4, "steps": 3})))
    steps = [event.step for event in events if isinstance(event, Progress) and event.note == ""]
    assert steps == [1, 2, 3]

    token = CancelToken()
    request = VideoRequest(**{**SMALL, "prompt": "a red hat", "num_frames": 4, "steps": 50}, cancel=token)
    seen = []
    from pipelines.base import Cancelled

    with pytest.raises(Cancelled):
        for event in video.generate(request):
            if isinstance(event, Progress) and event.step == 2 and not event.note:
                token.cancel()
            seen.append(event)
    assert max(event.step for event in seen if isinstance(event, Progress)) <= 3


def test_merging_touches_only_spatial_blocks_and_merges_tokens(video):
    from pipelines.diffusion.merging import apply_merging, remove_merging

    pipe = video.load("")
    handle = apply_merging(pipe.unet, 0.5, min_tokens=0)
    try:
        hooked = {name for name, module in pipe.unet.named_modules()
                  if module._forward_pre_hooks or module._forward_hooks}
        assert handle.blocks and all("motion_modules" not in name for name in handle.blocks)
        assert not any("motion_modules" in name for name in hooked)
    finally:
        remove_merging(pipe.unet)
    result = run(video, prompt="a red hat", num_frames=6, merge_ratio=0.5, merge_min_tokens=0)
    # finest level: 16x16 tokens per frame, half merged, 12 rows (6 frames x CFG), 3 blocks (down 1, up 2), 2 steps
    assert result.stats["tokens_merged"] == 128 * 12 * 3 * 2 and result.stats["blocks_merged"] == 3
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in pipe.unet.modules())
    stock = run(video, prompt="a red hat", num_frames=6)
    difference = np.abs(result.value.frames - stock.value.frames)
    assert 0 < difference.mean() < 0.25
