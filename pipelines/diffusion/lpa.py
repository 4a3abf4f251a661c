"""Local Prompt Adaptation (Sanjyal, arXiv 2507.20094): route content and style tokens to different UNet layers.

Inside a timestep window, layers tagged for style see no content tokens and layers tagged for content see no
style tokens. Suppression is a -inf bias on those keys (true masking): the official ``lp2`` code zeroes the
rows of ``encoder_hidden_states`` instead, which leaves them with score 0 and a share of the softmax.

Layer tags follow the official ``routing.py`` (down1, down2, mid, up1, up2) but are defined by role, not by
SD1.5 block index, so they are correct on SDXL too (SDXL has no attention in down_blocks.0 or up_blocks.2):
- down1: the encoder's first (highest-resolution) attention level — SD1.5 down_blocks.0, SDXL down_blocks.1;
- down2: the encoder's deeper attention levels — SD1.5 down_blocks.1-2, SDXL down_blocks.2;
- mid: the mid block;
- up1: the decoder's first (deepest) attention level — SD1.5 up_blocks.1, SDXL up_blocks.0;
- up2: the decoder's later, higher-resolution attention levels — SD1.5 up_blocks.2-3, SDXL up_blocks.1.
(The official table leaves SD1.5 down_blocks.2 and up_blocks.3 untagged; here they join their neighbours.)

``causal_style`` and ``causal_content`` (off by default, as in the paper): in a causal text encoder every token from
the style words on has read the style (the words after them and above all the end token and the padding), and the
end tokens have read the content too, so masking words alone leaves the style on content layers and the content on
style layers. ``causal_style`` counts every non-content token from the style words on as a style key;
``causal_content`` counts every key but the start token and the style words as a content key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .attention import KeyBias
from .prompts import end_positions

BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


@dataclass
class LPAConfig:
    # Paper's best setting, `lpa_late_only`: style -> up2, content -> down1 + mid, t in [300, 650].
    window: tuple[float, float] = (300.0, 650.0)
    style_tags: tuple[str, ...] = ("up2",)
    content_tags: tuple[str, ...] = ("down1", "mid")
    causal_style: bool = False  # not in the paper: content layers lose all that has read the style (the end too)
    causal_content: bool = False  # not in the paper: style layers keep only the start token and the style words


def layer_tags(layers: list[str]) -> dict[str, str]:
    """Tag of every cross-attention layer name: down1, down2, mid, up1 or up2."""
    down = sorted({int(m.group(2)) for n in layers if (m := BLOCK.match(n)) and m.group(1) == "down_blocks"})
    up = sorted({int(m.group(2)) for n in layers if (m := BLOCK.match(n)) and m.group(1) == "up_blocks"})
    tags = {}
    for name in layers:
        match = BLOCK.match(name)
        if match is None:
            continue
        if match.group(1) is None:
            tags[name] = "mid"
        elif match.group(1) == "down_blocks":
            tags[name] = "down1" if int(match.group(2)) == down[0] else "down2"
        else:
            tags[name] = "up1" if int(match.group(2)) == up[0] else "up2"
    return tags


def causal_keys(content: list[int], style: list[int], tokenizer: Any, text: str,
                config: LPAConfig) -> tuple[list[int], list[int]]:
    """(content keys, style keys) of ``text`` with ``causal_style`` and ``causal_content`` applied (the end token's
    and the padding's positions read only then). Without a style word both stay as they are."""
    if not (config.causal_style or config.causal_content) or not style:
        return content, style
    words, end = list(style), end_positions(tokenizer, text)
    if config.causal_style:
        style = sorted({*words, *(p for p in range(words[0], end[0]) if p not in content), *end})
    if config.causal_content:
        content = [p for p in range(1, end[-1] + 1) if p not in words]
    return content, style


def route_style_tokens(layers: list[str], content_tokens: list[int], style_tokens: list[int],
                       config: LPAConfig | None = None) -> list[KeyBias]:
    """The two -inf biases of LPA: content keys off on style layers, style keys off on content layers."""
    config = config or LPAConfig()
    tags = layer_tags(layers)
    style_layers = {n for n, tag in tags.items() if tag in config.style_tags}
    content_layers = {n for n, tag in tags.items() if tag in config.content_tags}
    biases = []
    if content_tokens and style_layers:
        biases.append(KeyBias(tokens=content_tokens, layers=style_layers, timesteps=config.window,
                              label="lpa: content keys off on style layers"))
    if style_tokens and content_layers:
        biases.append(KeyBias(tokens=style_tokens, layers=content_layers, timesteps=config.window,
                              label="lpa: style keys off on content layers"))
    return biases
