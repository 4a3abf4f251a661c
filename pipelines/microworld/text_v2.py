"""Micro-world v2 text encoder: a small CLIP trained here, contrastively, on scene/caption pairs, then frozen.

Why a CLIP of our own instead of v1's MiniLM (issue 22): the image controls exist to repair CLIP's failures, so
the encoder must fail for CLIP's reasons -- a causal mask (a word sees only the words before it, so "red" in
"a red circle and a blue square" cannot know which noun it belongs to), the sentence read out at the end token
(EOT pooling: the contrastive loss trains only that position), and padding with repeated end tokens (what ToMe's
end-token substitution and the leakage fix act on). MiniLM is bidirectional and barely contextual.

It is a real ``CLIPTextModel`` with a real ``CLIPTokenizer`` (word-level merges over the captions' words, bytes
for anything else; ``<|startoftext|>`` at position 0), so the SD pipeline, the token-position arithmetic of the
controls and compass placeholders work unchanged. The image side is a small ``CLIPVisionModel`` (ViT, 8x8
patches), used for pretraining only. ``CLIPModel`` computes the symmetric InfoNCE loss itself.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ..diffusion.compass import ORIENTATION_PHRASES
from .scenes import DIRECTIONS
from .scenes_v2 import SIZE, vocabulary

MAX_TOKENS = 77
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt on ``words`` (each counted once) until every word is one symbol.

    Deterministic (ties broken by spelling), and encoding applies merges in the order learnt, so each word comes
    out as exactly one token -- unlike merges that simply spell each word left to right, where an earlier
    word's pair (the "ar" of "arrow") splits a later one ("squ" "ar" "e")."""
    from collections import Counter

    spelled = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in spelled for pair in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for index, symbols in enumerate(spelled):
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[index] = merged


def build_tokenizer() -> Any:
    """The v2 ``CLIPTokenizer``: every caption word and every orientation-phrase word is one token, any other text
    spells out in bytes; padding repeats the end token, as CLIP's."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    words = set(vocabulary()) | {w.strip(",") for phrase in ORIENTATION_PHRASES for w in phrase.split()}
    merges = learn_merges(sorted(words))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=SPECIALS[1], model_max_length=MAX_TOKENS)


def clip_config(tokenizer: Any, width: int = 256, layers: int = 3, vision_layers: int = 4, size: int = SIZE) -> Any:
    """Text tower: causal, EOT-pooled (the end token's id is not CLIP's legacy 2). Vision: 8x8 patches of the image."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                          max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=eos, pad_token_id=eos, projection_dim=width, hidden_act="gelu")
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=vision_layers,
                              num_attention_heads=max(1, width // 64), image_size=size, patch_size=size // 8,
                              projection_dim=width, hidden_act="gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=width)


def build_clip(tokenizer: Any, width: int = 256, layers: int = 3, vision_layers: int = 4, size: int = SIZE,
               seed: int = 0) -> Any:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config(tokenizer, width, layers, vision_layers, size))


def text_encoder_of(clip: Any) -> Any:
    """The trained text tower as a standalone, frozen ``CLIPTextModel`` (what the SD pipeline loads)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    # transformers releases differ in whether the towers wrap a ``text_model`` module
    target = getattr(encoder, "text_model", encoder)
    target.load_state_dict(getattr(clip.text_model, "text_model", clip.text_model).state_dict())
    return encoder.requires_grad_(False).eval()


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (padded with EOT to 77)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the [-1, 1] range the ViT is trained on."""
    return images * 2 - 1


def named_headings(captions: list[str]) -> torch.Tensor:
    """[captions, 8]: which of ``DIRECTIONS`` each caption names ("pointing up-left"), the heading probe's target."""
    named = torch.zeros(len(captions), len(DIRECTIONS))
    for row, caption in enumerate(captions):
        for word in re.findall(r"pointing ([a-z-]+)", caption):
            named[row, DIRECTIONS.index(word)] = 1
    return named


def heading_probe(clip: Any) -> torch.nn.Linear:
    """A linear read of the directions a caption names from its sentence embedding, trained beside the contrastive
    loss and then dropped. Why: contrastive pretraining alone left "pointing left" and "pointing right" nearly one
    text (cosine 0.98-0.99), hard negatives or not, so the UNet had no heading to learn from; the probe makes the
    sentence state carry the heading, so the causal tower must keep the direction words apart."""
    return torch.nn.Linear(clip.config.text_config.hidden_size, len(DIRECTIONS))


def contrastive_loss(clip: Any, ids: torch.Tensor, images: torch.Tensor, hard_ids: torch.Tensor | None = None,
                     hard_valid: torch.Tensor | None = None, probe: torch.nn.Linear | None = None,
                     headings: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric loss; ``hard_ids`` (one caption per image with its arrows turned, ``hard_valid`` where it
    differs from the true one) are extra texts every image must score below its own caption. With a ``probe``, plus
    its cross-entropy at reading the directions each text names (``headings``: ``named_headings`` of every text
    passed, captions then turned ones; texts that name none are left out)."""
    texts = ids if hard_ids is None else torch.cat([ids, hard_ids])
    out = clip(input_ids=texts, pixel_values=pixel_values(images))
    per_image = out.logits_per_image.float()
    if hard_ids is not None:
        per_image[:, len(ids):] = per_image[:, len(ids):].masked_fill(~hard_valid[None], float("-inf"))
    target = torch.arange(len(ids), device=ids.device)
    loss = (F.cross_entropy(per_image, target) + F.cross_entropy(out.logits_per_text[: len(ids)].float(), target)) / 2
    if probe is None:
        return loss
    naming = headings.any(-1)
    if not bool(naming.any()):
        return loss
    readout = probe_logits(clip, probe, out.text_embeds[naming]).float()
    return loss + F.cross_entropy(readout, headings[naming] / headings[naming].sum(-1, keepdim=True))


def probe_logits(clip: Any, probe: torch.nn.Linear, embeds: torch.Tensor) -> torch.Tensor:
    """The probe's scores at CLIP's own temperature (unit-length embeddings give small logits otherwise)."""
    return probe(embeds) * clip.logit_scale.exp()


def sentence_embeds(clip: Any, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's normalised text embeddings (``CLIPOutput.text_embeds``) without an image: what the probe reads.
    Spelt out because ``get_text_features`` returns a tensor in transformers 4 and an output object in 5."""
    return F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)


@torch.no_grad()
def probe_accuracy(clip: Any, probe: torch.nn.Linear, ids: torch.Tensor, headings: torch.Tensor) -> float:
    """Share of captions naming a heading whose likeliest direction by the probe is one they name."""
    naming = headings.any(-1)
    if not bool(naming.any()):
        return float("nan")
    best = probe_logits(clip, probe, sentence_embeds(clip, ids[naming])).argmax(-1)
    return float(headings[naming].gather(1, best[:, None]).mean())


@torch.no_grad()
def heading_accuracy(clip: Any, ids: torch.Tensor, images: torch.Tensor, hard_ids: torch.Tensor,
                     hard_valid: torch.Tensor) -> float:
    """Share of images with a named arrow heading that score their own caption above the turned one."""
    if not bool(hard_valid.any()):
        return float("nan")
    per_image = clip(input_ids=torch.cat([ids, hard_ids]), pixel_values=pixel_values(images)).logits_per_image
    rows = torch.arange(len(ids), device=ids.device)
    wins = per_image[rows, rows] > per_image[rows, rows + len(ids)]
    return float(wins[hard_valid].float().mean())


@torch.no_grad()
def retrieval_accuracy(clip: Any, ids: torch.Tensor, images: torch.Tensor) -> float:
    """Share of images whose own caption is the best-scoring one in the batch (a quick read of what was learnt)."""
    logits = clip(input_ids=ids, pixel_values=pixel_values(images)).logits_per_image
    return float((logits.argmax(-1) == torch.arange(len(ids), device=logits.device)).float().mean())
