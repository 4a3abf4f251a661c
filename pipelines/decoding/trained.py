"""Where a self-distilled drafter's weights live and how a model finds its own: the user's cache
(``$TOKENWORKS_CACHE/<folder>/<technique>-<model>.safetensors``, what the training commands write), else the
ones packaged in ``weights/``. Stateless: a model's DecodingState loads them once and keeps them."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

PACKAGED = Path(__file__).parent / "weights"


def weights_name(model_name: str, technique: str) -> str:
    """File name for a model id: (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``ppd``) ->
    ``ppd-smollm2-135m-instruct.safetensors``."""
    return technique + "-" + re.sub(r"[^a-z0-9.-]+", "-", model_name.split("/")[-1].lower()) + ".safetensors"


class TrainedWeights:
    """One technique's trained weights: ``path`` finds them for a model id, ``load_for`` loads them
    (``load(path, model)``). Nothing is kept here: ``state.DecodingState`` holds what was loaded for a model."""

    def __init__(self, technique: str, folder: str, load: Callable[[Path, torch.nn.Module], Any]) -> None:
        self.technique, self.folder, self.load = technique, folder, load

    def default_out(self, model_name: str) -> Path:
        """Where training writes them (and where ``path`` looks first)."""
        from ..settings import cache_dir

        return cache_dir() / self.folder / weights_name(model_name, self.technique)

    def path(self, model_name: str) -> Path | None:
        """Where ``model_name``'s trained weights are: the user's cache first, then the packaged ones."""
        for path in (self.default_out(model_name), PACKAGED / weights_name(model_name, self.technique)):
            if path.is_file():
                return path
        return None

    def load_for(self, model: torch.nn.Module, model_name: str) -> Any:
        """``model_name``'s trained weights loaded for ``model`` (read from disk on every call), or None when
        there are none."""
        path = self.path(model_name) if model_name else None
        return self.load(path, model) if path else None
