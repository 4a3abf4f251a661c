"""Cheap live previews: a linear latent -> RGB map fitted once per VAE, instead of a VAE decode per step.

The map is fitted by least squares on the VAE's own encodings of solid-colour swatches, so it needs no
published coefficients and works for any VAE (SD1.5, SDXL, the tiny random one)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

SWATCHES = [(-1, -1, -1), (1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1),
            (0, 0, 0), (0.5, -0.5, 0)]


@torch.no_grad()
def fit_latent_rgb(vae: Any, size: int = 64) -> torch.Tensor:
    """[channels + 1, 3] affine map from scaled latents to RGB in [-1, 1]."""
    colours = torch.tensor(SWATCHES, dtype=torch.float32)
    images = colours[:, :, None, None].expand(-1, -1, size, size)
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float()
    latents = latents * vae.config.scaling_factor
    features = torch.cat([latents.mean(dim=(2, 3)).cpu(), torch.ones(len(SWATCHES), 1)], dim=1)
    return torch.linalg.lstsq(features, colours).solution


def latent_preview(latents: torch.Tensor, rgb_map: torch.Tensor, upscale: int = 1) -> list[Any]:
    """One PIL image per batch row from [B, C, h, w] latents."""
    from PIL import Image

    x = latents.detach().float().cpu()
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    rgb = torch.einsum("bchw,cd->bhwd", x, rgb_map).clamp(-1, 1)
    pixels = ((rgb + 1) * 127.5).round().to(torch.uint8).numpy()
    images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
    return images
