"""AnimateDiff as the video tab drives it: loading (with a spatial LoRA saved beside the adapter fused in), the
authors' scheduler, FreeNoise on and off, the stock denoising call and its decode.

FreeNoise (diffusers' ``enable_free_noise``) gives sliding context windows for videos longer than the motion
module's window and per-frame prompts; ``exact_lerp`` makes its prompt interpolation realise the shot timeline
(``timeline.py``) exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..base import CancelToken, Event
from ..models import ModelSpec, ModelStore, ResolvedModel
from ..tiny import tiny_animatediff_pipeline
from .fast import FastUNet
from .loop import Refine, step_callback

# A LoRA on the base's spatial layers trained with the adapter (micro-world's ``train_motion --spatial-lora``), kept
# in the motion folder under diffusers' default LoRA file name.
SPATIAL_LORA = "pytorch_lora_weights.safetensors"


def animatediff_scheduler(base: str | None, linear_betas: bool = True):
    """DDIM with the settings the AnimateDiff authors (and the diffusers docs) use: linear betas, linspace.
    ``linear_betas=False`` keeps the base's own betas: for an adapter trained on its base's schedule (micro-world)."""
    from diffusers import DDIMScheduler

    settings = dict(clip_sample=False, timestep_spacing="linspace", steps_offset=1)
    if linear_betas:
        settings["beta_schedule"] = "linear"
    if base is None:
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, **settings)
    return DDIMScheduler.from_pretrained(base, subfolder="scheduler", **settings)


def load_animatediff(resolved: ResolvedModel, store: ModelStore):
    """A MotionAdapter (the spec's Hub id or packaged folder) on its SD1.5 base (the spec's ``base`` Hub id or
    ``base_package``), or the tiny one. ``base_betas`` keeps the base's noise schedule (see animatediff_scheduler).
    A ``SPATIAL_LORA`` in the adapter's folder is fused into this pipeline's own UNet (``fuse_spatial_lora``)."""
    if resolved.source == "tiny":
        pipe = tiny_animatediff_pipeline().to(dtype=store.dtype)
    else:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        spec = resolved.spec
        base_id, base_package = spec.option("base"), spec.option("base_package")
        base = store.resolve(ModelSpec(base_id or base_package, "sd15", hub_id=base_id, package=base_package)).location
        lora = (Path(resolved.location) / SPATIAL_LORA).is_file()
        dtype = torch.float32 if lora else store.dtype
        adapter = MotionAdapter.from_pretrained(resolved.location, torch_dtype=dtype)
        pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=adapter, torch_dtype=dtype)
        if lora:
            fuse_spatial_lora(pipe, resolved.location)
            pipe.to(dtype=store.dtype)
        pipe.scheduler = animatediff_scheduler(base, linear_betas=not spec.option("base_betas", False))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(store.device)


def fuse_spatial_lora(pipe, folder: str) -> None:
    """The folder's ``SPATIAL_LORA`` fused into ``pipe.unet`` and the LoRA layers removed: plain weights, so the
    fast path captures the UNet as it does without one (``fast.supported`` refuses PEFT layers). Fused in fp32 before
    the pipeline is cast: a bf16 weight plus an update under half its spacing rounds back to the weight. The UNet is
    the motion UNet this pipeline built from its own base load (``UNetMotionModel.from_unet2d`` copies weights), so
    the image tab's stored UNet is not touched."""
    pipe.unet.load_lora_adapter(folder, weight_name=SPATIAL_LORA, prefix="unet")  # as pipe.load_lora_weights does
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()


def exact_lerp(start_frame: int, end_frame: int, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """FreeNoise's segment interpolation, but exact at the ends and constant when both keys hold one prompt.

    A timeline segment either holds one shot (both keyframes carry the same prompt) or is a transition; a
    cut is a two-frame transition, so exact endpoints make it a true step function.
    """
    count = end_frame - start_frame + 1
    if torch.equal(start, end):
        return start.repeat(count, *([1] * (start.ndim - 1)))
    rows = [start]
    for index in range(1, count - 1):
        alpha = index / (count - 1)
        rows.append((1 - alpha) * start + alpha * end)
    rows.append(end)
    return torch.cat(rows)


@contextmanager
def free_noise(pipe, active: bool, context_length: int, context_stride: int) -> Iterator[None]:
    """FreeNoise's context windows and timeline interpolation while ``active``, then the stock blocks back.

    Install it before anything else: it swaps the motion modules' transformer blocks, which must not discard
    what is installed after it."""
    if active:
        pipe.enable_free_noise(context_length=context_length, context_stride=context_stride,
                               prompt_interpolation_callback=exact_lerp)
    try:
        yield
    finally:
        if active:
            disable_free_noise(pipe)


def disable_free_noise(pipe) -> None:
    """``pipe.disable_free_noise()`` without its crash on adapters that have no mid-block motion module.

    diffusers 0.42 rebuilds the block list with ``mid_block`` unconditionally, so AnimateDiff v1-5-3
    (``use_motion_mid_block=False``) raises AttributeError; skip blocks without motion modules instead.
    """
    pipe._free_noise_context_length = None
    for block in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]:
        if hasattr(block, "motion_modules"):
            pipe._disable_free_noise_in_block(block)


def denoise(pipe, arguments: dict[str, Any], total: int, cancel: CancelToken,
            emit: Callable[[Event], None], fast: FastUNet | None = None, refine: Refine | None = None) -> torch.Tensor:
    """The stock diffusers call with the shared step callback (diffusion/loop.py): progress, Stop, refinement.
    With ``fast`` the UNet calls take the captured path (diffusion/fast.py)."""
    fast = fast or FastUNet(pipe.unet, "off")
    with fast:
        return pipe(**arguments, callback_on_step_end=step_callback(total, cancel, emit, fast, refine),
                    callback_on_step_end_tensor_inputs=["latents"]).frames


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """The stock pipeline's own decode and post-processing, as (frames, height, width, 3) floats in [0, 1]."""
    with torch.no_grad():
        video = pipe.decode_latents(latents, decode_chunk_size=16)
        return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
