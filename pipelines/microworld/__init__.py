"""Micro-world: procedural scenes with exact ground truth, small latent diffusion models trained on them, and a
classical scorer, so the image controls can be measured offline.

v1's scene geometry and renderer (``scenes``) and classical detector (``scorer``) remain: v2 draws with that
geometry and scores with that detector (v1's MiniLM-conditioned model, its trainer and benchmarks were retired
with its weights; they are in the history). v2 (issue 22): ``scenes_v2`` (128 px, GPU-rendered, skewed priors
with held-out swaps), ``text_v2`` (a causal CLIP text encoder trained here), ``train_v2`` (resumable staged
trainer), ``compass_v2`` and ``scorer_v2`` (precision and validity). Its committed folder (``weights_v2``) is a
complete SD pipeline folder, the image tab's offline default. ``motion_v2`` (moving scenes) and ``train_motion``
train a ``MotionAdapter`` for the frozen v2 pipeline; its committed folder (``weights_motion_v2``, 966 steps so
far) is the video tab's offline model. v3 is v2 with its UNet conditioned on the word tokens only
(``word_readout``, ``train_v2 --text-readout words``): once its folder (``weights_v3``) is committed, the image tab
serves it instead of v2; the video tab stays on v2, the base its adapter was trained on.
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS_V2 = Path(__file__).resolve().parent / "weights_v2"
WEIGHTS_V3 = Path(__file__).resolve().parent / "weights_v3"
PARTS = ("model_index.json", "text_encoder/model.safetensors", "unet/config.json", "vae/config.json",
         "tokenizer/tokenizer_config.json")


def complete(folder: Path) -> bool:
    return all((folder / part).is_file() for part in PARTS)


def served_weights() -> Path | None:
    """The image tab's micro-world folder: v3 (``WEIGHTS_V3``, the UNet reading word tokens only) once it is
    committed, else v2; None while neither is complete (the preset is then simply not available)."""
    return next((folder for folder in (WEIGHTS_V3, WEIGHTS_V2) if complete(folder)), None)


def packaged_model_folder() -> str | None:
    """``served_weights`` as a string, for the ModelStore (v3's text encoder class is imported by the loader,
    ``diffusion.models.import_own_components``)."""
    folder = served_weights()
    return str(folder) if folder else None


def packaged_v2_folder() -> str | None:
    """The committed v2 folder, whatever the image tab serves: the base the motion adapter was trained on."""
    return str(WEIGHTS_V2) if complete(WEIGHTS_V2) else None


WEIGHTS_MOTION_V2 = Path(__file__).resolve().parent / "weights_motion_v2"


def packaged_motion_folder() -> str | None:
    """The committed micro-world motion adapter (``WEIGHTS_MOTION_V2``), or None while it or the v2 pipeline it
    sits on (``packaged_v2_folder``, never v3) is missing (the video preset is then not listed)."""
    weights = WEIGHTS_MOTION_V2
    stored = (weights / "diffusion_pytorch_model.safetensors").is_file() or (
        weights / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return str(weights) if stored and (weights / "config.json").is_file() and packaged_v2_folder() else None
