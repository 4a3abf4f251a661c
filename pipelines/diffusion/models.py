"""The image tab's models: SD1.5 / SDXL pipelines as stored (with their live-preview map) and the samplers a
request can pick, each a fresh scheduler on the stored components."""
from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base import PipelineError, require_range
from ..models import ModelSpec, ModelStore, ResolvedModel
from .preview import fit_latent_rgb
from .state import UNetState, unet_state

TINY_SIDE = 32  # a tiny preset's side: 4x4 latents


def request_sides(request: Any, spec: ModelSpec, default: int, low: int, high: int) -> tuple[int, int]:
    """The request's width and height, 0 asking for the model's native side (its spec's ``size`` option, else
    ``default``): in range and multiples of 8, the VAE's downsampling. The image and video tabs check them alike."""
    native = TINY_SIDE if spec.tiny else int(spec.option("size") or default)
    request.width, request.height = int(request.width) or native, int(request.height) or native
    for name, value in (("Width", request.width), ("Height", request.height)):
        require_range(value, name, low, high)
        if value % 8:
            raise PipelineError(f"{name} must be a multiple of 8, got {value}.")
    return request.width, request.height


SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "default": None,
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


@dataclass
class LoadedImageModel:
    pipe: Any
    arch: str
    preview_map: torch.Tensor

    @property
    def components(self) -> dict[str, Any]:
        return self.pipe.components

    @property
    def state(self) -> UNetState:
        """What the techniques keep for this model's UNet across requests (merging, captured graphs)."""
        return unet_state(self.pipe.unet)


def import_own_components(folder: str) -> None:
    """Import the Tokenworks modules (``pipelines.*``) a local pipeline folder's ``model_index.json`` names, such as
    micro-world v3's ``WordReadoutCLIPTextModel``: diffusers resolves a component named by module path only from
    ``sys.modules`` and never imports one itself. Only our own package, so a folder cannot run code by naming it."""
    index = Path(folder) / "model_index.json"
    entries = json.loads(index.read_text()).values() if index.is_file() else ()
    for entry in entries:
        if isinstance(entry, list) and isinstance(entry[0], str) and entry[0].startswith("pipelines."):
            importlib.import_module(entry[0])


def load_image_model(resolved: ResolvedModel, store: ModelStore) -> LoadedImageModel:
    arch = resolved.spec.kind
    if resolved.source == "tiny":
        from ..tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

        pipe = (tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()).to(store.device, store.dtype)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        import_own_components(resolved.location)
        pipe = cls.from_pretrained(resolved.location, torch_dtype=store.dtype).to(store.device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedImageModel(pipe, arch, fit_latent_rgb(pipe.vae))


def latent_size(pipe: Any, request: Any) -> tuple[int, int]:
    """The latent grid of an ``ImageRequest``'s size."""
    return int(request.height) // pipe.vae_scale_factor, int(request.width) // pipe.vae_scale_factor


def scheduled_pipe(model: LoadedImageModel, name: str) -> Any:
    """The loaded pipeline with a fresh scheduler (no scheduler state shared across requests).

    A shallow copy, so the components are the stored ones, untouched: diffusers' ``from_pipe`` casts every
    component to ``torch_dtype or float32``, which turned a bf16 store into fp32 after one request."""
    import diffusers

    base = model.pipe
    choice = SCHEDULERS[name]
    if choice is None:
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
    else:
        cls_name, options = choice
        scheduler = getattr(diffusers, cls_name).from_config(base.scheduler.config, **options)
    pipe = copy.copy(base)
    pipe.scheduler = scheduler
    return pipe
