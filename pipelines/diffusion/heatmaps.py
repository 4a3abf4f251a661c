"""Cross-attention heatmaps of chosen tokens, overlaid on the generated image."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..base import PipelineError
from ..outputs import save_png
from .prompts import find_words, token_positions

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


def heatmap_tokens(tokenizer: Any, text: str, words: list[str]) -> list[tuple[str, list[int]]]:
    """Each chosen word as it occurs in ``text``, with its token positions."""
    chosen = []
    for word in words:
        span = find_words(text, word)
        if span is None:
            raise PipelineError(f"Heatmap word '{word}' does not occur in the prompt.")
        chosen.append((span.text, token_positions(tokenizer, text, span.start, span.end)))
    return chosen


def save_heatmaps(images: list[Any], recorder: Any, tokens: list[tuple[str, list[int]]],
                  parameters: dict[str, Any], seed: int, variant: str) -> list[list[str]]:
    """[path, caption] per (image, word): the word's map averaged over its tokens, layers and steps."""
    if recorder is None or not recorder.maps:
        return []
    maps = recorder.aggregate().cpu().numpy()  # [batch, h, w, recorded tokens]
    saved, column = [], 0
    spans = []
    for word, positions in tokens:
        spans.append((word, column, column + len(positions)))
        column += len(positions)
    for index, image in enumerate(images):
        for word, first, last in spans:
            heat = maps[index, :, :, first:last].mean(-1)
            path = save_png(overlay(image, heat), {**parameters, "heatmap_word": word,
                                                   "variant": variant, "seed": seed + index})
            saved.append([str(path), f"{variant} #{index + 1}: {word}"])
    return saved
