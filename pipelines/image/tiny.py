"""Tiny random-initialised SD1.5 and SDXL pipelines with a CLIP tokenizer built in-process (no downloads).

The UNets keep the real block layout (SD1.5: three cross-attention levels over a plain bottom level; SDXL: no
attention at the top level and deeper transformer stacks below), so layer names such as
``up_blocks.0.attentions.1.transformer_blocks.3`` and the routing rules built on them are exercised for real.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..tiny import TINY_CORPUS

CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
IMAGE_CORPUS = TINY_CORPUS + (
    " a photo of a cat wearing sunglasses and a dog wearing a hat, a white cat and a black dog, a green bench "
    "and a blue bowl, a wooden table with a glass vase, a castle in watercolor style, a city street in the "
    "style of van gogh, oil painting, pixel art aesthetic, a pool by a table, golden gate bridge at sunset"
)


@lru_cache(maxsize=2)
def tiny_clip_tokenizer(vocab_size: int = 1024, pad_token: str = "<|endoftext|>"):
    """A real ``CLIPTokenizer`` whose vocab and merges are built here from a fixed corpus.

    Built by hand rather than with ``tokenizers``' BPE trainer: the trainer's ids change from one process to
    the next (hash-map order), which made every tiny image test depend on the process. Here the most frequent
    corpus words (ties by spelling) each get the merges that spell them left to right, so ids are fixed."""
    import re
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*CLIP_SPECIALS, *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    counts = Counter(re.findall(r"[a-z]+|[0-9]", IMAGE_CORPUS.lower()))
    merges: list[tuple[str, str]] = []
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
            left += right
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def tiny_text_encoder(seed: int, hidden: int, projection: bool, vocab_size: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=eos_id, pad_token_id=eos_id, hidden_size=hidden,
                            intermediate_size=2 * hidden, layer_norm_eps=1e-5, num_attention_heads=2,
                            num_hidden_layers=2, projection_dim=hidden, vocab_size=vocab_size,
                            max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=64).eval()


def tiny_sd15_pipeline(seed: int = 0):
    """SD1.5 layout: CrossAttnDown x3 + Down, Up + CrossAttnUp x3, one transformer block per attention."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    encoder = tiny_text_encoder(seed + 1, 16, False, len(tokenizer), tokenizer.eos_token_id)
    return StableDiffusionPipeline(vae=tiny_vae(seed + 2), text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL layout: Down + CrossAttnDown x2 with transformer depth growing downwards (real SDXL: 0, 2, 10)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 4), cross_attention_dim=32, attention_head_dim=(2, 4, 4),
        norm_num_groups=4, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    encoder = tiny_text_encoder(seed + 1, 16, False, len(tokenizer), tokenizer.eos_token_id)
    encoder_2 = tiny_text_encoder(seed + 3, 16, True, len(tokenizer_2), tokenizer_2.eos_token_id)
    return StableDiffusionXLPipeline(vae=tiny_vae(seed + 2), text_encoder=encoder, text_encoder_2=encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
