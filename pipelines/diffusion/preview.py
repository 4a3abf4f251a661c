"""Cheap live previews: a linear latent -> RGB map fitted once per VAE, instead of a VAE decode per step.

The map is fitted by least squares on the VAE's own encodings of solid-colour swatches, so it needs no
published coefficients and works for any VAE (SD1.5, SDXL, the tiny random one)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

SWATCHES = [(-1, -1, -1), (1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1),
            (0, 0, 0), (0.5, -0.5, 0)]


@torch.no_grad()
def fit_latent_rgb(vae: Any, size: int = 64) -> torch.Tensor:
    """[channels + 1, 3] affine map from scaled latents to RGB in [-1, 1], on the VAE's device: a map on the host
    would be copied to the GPU at every preview, a pageable copy that waits for every queued step (measured: the
    previews of a 1024 px SD1.5 run cost 0.28 s of its 1.4 s)."""
    colours = torch.tensor(SWATCHES, dtype=torch.float32)
    images = colours[:, :, None, None].expand(-1, -1, size, size)
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float()
    latents = latents * vae.config.scaling_factor
    features = torch.cat([latents.mean(dim=(2, 3)).cpu(), torch.ones(len(SWATCHES), 1)], dim=1)
    return torch.linalg.lstsq(features, colours).solution.to(param.device)


def latent_rgb(latents: torch.Tensor, rgb_map: torch.Tensor) -> torch.Tensor:
    """[B, h, w, 3] uint8 on the latents' device (a few small kernels, no host sync)."""
    x = latents.detach().float()
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    rgb = torch.einsum("bchw,cd->bhwd", x, rgb_map.to(x.device)).clamp(-1, 1)
    return ((rgb + 1) * 127.5).round().to(torch.uint8)


def to_images(pixels: torch.Tensor, upscale: int = 1) -> list[Any]:
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels.numpy()]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
    return images


class AsyncPreviews:
    """Live previews that never stall the denoising loop.

    Reading latents back each step (``.cpu()``) makes the host wait for the GPU, so the next step's kernels are
    only queued once the previous ones finish. Here a preview is copied to pinned host memory on the side and
    handed out by ``ready()`` once its copy has landed; the loop never waits. Previews are taken at most every
    ``interval`` seconds (a browser shows no more) and scaled to at most ``side`` pixels: per-step PIL work at
    full size cost 10 ms a step at 1024 px."""

    def __init__(self, rgb_map: torch.Tensor, upscale: int = 1, interval: float = 0.1, side: int = 512) -> None:
        self.rgb_map, self.upscale, self.interval, self.side = rgb_map, upscale, interval, side
        self.pending: list[tuple[Any, torch.Tensor]] = []
        self.last = -float("inf")

    def add(self, latents: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        pixels = latent_rgb(latents, self.rgb_map)
        if pixels.device.type != "cuda":
            self.pending.append((None, pixels))
            return
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((done, host))

    def ready(self) -> list[Any] | None:
        """The newest preview whose copy has finished (older ready ones are skipped), else None."""
        newest = None
        while self.pending and (self.pending[0][0] is None or self.pending[0][0].query()):
            newest = self.pending.pop(0)[1]
        if newest is None:
            return None
        upscale = max(1, min(self.upscale, self.side // max(newest.shape[1], newest.shape[2])))
        return to_images(newest, upscale)
