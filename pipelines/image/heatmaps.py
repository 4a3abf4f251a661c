"""Cross-attention heatmaps of chosen tokens, overlaid on the generated image."""
from __future__ import annotations

from typing import Any

import numpy as np

# Anchor colours of a perceptually ordered dark-to-bright colormap (black, purple, red, orange, pale yellow).
ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """[h, w] values -> [h, w, 3] uint8, normalised to the map's own min..max."""
    low, high = float(heat.min()), float(heat.max())
    unit = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    position = unit * (len(ANCHORS) - 1)
    index = np.clip(position.astype(int), 0, len(ANCHORS) - 2)
    frac = (position - index)[..., None]
    return (ANCHORS[index] * (1 - frac) + ANCHORS[index + 1] * frac).astype(np.uint8)


def overlay(image: Any, heat: np.ndarray, alpha: float = 0.55) -> Any:
    """The image with the heatmap (bilinearly upsampled to its size) blended on top."""
    from PIL import Image

    coloured = Image.fromarray(colorize(heat.astype(np.float32))).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), coloured, alpha)
