"""Where a self-distilled drafter's weights live and how a model finds its own: the user's cache
(``$TOKENWORKS_CACHE/<folder>/<technique>-<model>.safetensors``, what the training commands write), else the
ones packaged in ``weights/``. Loaded once per model and kept with it."""
from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

PACKAGED = Path(__file__).parent / "weights"


def weights_name(model_name: str, technique: str) -> str:
    """File name for a model id: (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``ppd``) -> ``ppd-smollm2-135m-instruct.safetensors``."""
    return technique + "-" + re.sub(r"[^a-z0-9.-]+", "-", model_name.split("/")[-1].lower()) + ".safetensors"


class TrainedWeights:
    """One technique's trained weights: ``path`` finds them for a model id, ``for_model`` loads them once per
    model (``load(path, model)``), ``use`` sets or clears them (tests, or weights trained in this process)."""

    def __init__(self, technique: str, folder: str, load: Callable[[Path, torch.nn.Module], Any]) -> None:
        self.technique, self.folder, self.load = technique, folder, load
        self._loaded: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()

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

    def for_model(self, model: torch.nn.Module, model_name: str) -> Any:
        """The model's trained weights (loaded once and kept with the model), or None when there are none."""
        if model not in self._loaded:
            path = self.path(model_name) if model_name else None
            self._loaded[model] = self.load(path, model) if path else None
        return self._loaded[model]

    def use(self, model: torch.nn.Module, value: Any) -> None:
        """Set (or clear) what is kept with ``model`` (tests, or weights trained in this process)."""
        self._loaded[model] = value
