"""Tiny random-initialised models of the real classes, with tokenizers built locally (no downloads): every
builder the ``tiny`` preset and the tests use, for every tab.

Used the way transformers and diffusers test themselves. Seeds are fixed: tests compare exact outputs.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .audio.bark import BarkTTS

TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A red hat and a blue car. "
    "Once upon a time there was a small robot who liked to sing songs about the sea. "
    "def add(a, b):\n    return a + b\n"
    "Translate to English: Guten Morgen. Summarize the following text in one sentence. "
    "1 2 3 4 5 6 7 8 9 10 — questions, answers, verses and choruses."
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in-process on a fixed corpus: deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),  # a set: sort it, or ids vary per process
        show_progress=False,
    )
    tokenizer.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(family: str = "llama", seed: int = 0, vocab_size: int = 320):
    """A 2-layer causal LM of a real architecture with random weights, fp32."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    elif family == "gemma3":  # a sliding layer then a full one, with a window of 8 tokens (Gemma-3-270M: 512)
        config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                                  **common)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"Unknown tiny family {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


# ---- image: SD1.5 and SDXL ---------------------------------------------------------------------------------
# The UNets keep the real block layout (SD1.5: three cross-attention levels over a plain bottom level; SDXL: no
# attention at the top level and deeper transformer stacks below), so layer names such as
# ``up_blocks.0.attentions.1.transformer_blocks.3`` and the routing rules built on them are exercised for real.
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


# ---- video: AnimateDiff ------------------------------------------------------------------------------------
def tiny_animatediff_pipeline(seed: int = 0):
    """The image tab's tiny SD1.5 (real block layout) inflated with a tiny MotionAdapter into a UNetMotionModel."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel

    from .diffusion.animatediff import animatediff_scheduler

    sd = tiny_sd15_pipeline(seed)
    torch.manual_seed(seed + 10)
    adapter = MotionAdapter(block_out_channels=sd.unet.config.block_out_channels, motion_layers_per_block=1,
                            motion_num_attention_heads=2, motion_norm_num_groups=4, motion_max_seq_length=32,
                            use_motion_mid_block=False)
    unet = UNetMotionModel.from_unet2d(sd.unet, adapter).eval()
    return AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=animatediff_scheduler(None))


# ---- audio: Bark (speech, sung vocals), MusicGen and ACE-Step (song) ----------------------------------------
def randomize_codebooks(codec, seed: int) -> None:
    """Give a random-initialised EnCodec distinct code vectors. EnCodec initialises its codebooks to zeros (they
    are learnt), so every code of a tiny codec decodes alike and no seam test could see a wrong seam."""
    generator = torch.Generator().manual_seed(seed)
    for layer in codec.quantizer.layers:
        embed = layer.codebook.embed
        embed.copy_(torch.randn(embed.shape, generator=generator).to(embed))


TINY_SEMANTIC_VOCAB = 40
TINY_CODEBOOK = 32


def tiny_bark_tokenizer():
    """A BERT WordPiece tokenizer (Bark's tokenizer class) over a small vocabulary built here: characters + words."""
    import string

    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    words = sorted({w.strip(string.punctuation).lower() for w in TINY_CORPUS.split()} - {""})
    vocab += [w for w in words if w not in vocab][:40]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})


TINY_EOS_BIAS = -1e4  # exp(-1e4 / T) is 0 in fp32 for every temperature the UI allows (<= 2)


def tiny_bark(seed: int = 0, eos_bias: float = TINY_EOS_BIAS) -> BarkTTS:
    """``BarkModel`` with 2-layer, 32-wide semantic/coarse/fine models and a 4-filter EnCodec (24 kHz, hop 320).

    Vocabulary layout and generation configs keep Bark's structure (text offset after the semantic vocabulary,
    pad/infer tokens after the codebooks, 8 fine codebooks) at a small scale. The fine stage's window is 128 frames
    with 64 of history (Bark: 1024 and 512): it pads every call to the full window, which made it most of a tiny
    request's time.

    Random weights give the semantic EOS about a 1-in-41 chance at every step, so some seeds ended before the
    first speech token and a tiny request (and any test drawing a random seed) produced no audio. ``eos_bias`` is
    added to the semantic head's EOS logit: the default holds EOS down, so the semantic stage always runs to its
    cap; a large positive one makes EOS come first, for tests of the "no audio" path.
    """
    from transformers import BarkConfig, BarkModel, EncodecConfig
    from transformers.models.bark.generation_configuration_bark import BarkGenerationConfig

    from .audio.bark import BarkTTS

    tokenizer = tiny_bark_tokenizer()
    semantic_vocab, codebook = TINY_SEMANTIC_VOCAB, TINY_CODEBOOK
    text_offset = semantic_vocab + 8
    text_vocab = len(tokenizer)
    coarse_vocab = semantic_vocab + 2 * codebook + 8
    sub = dict(num_layers=2, num_heads=2, hidden_size=32, block_size=1024)
    config = BarkConfig(
        semantic_config=dict(input_vocab_size=text_offset + text_vocab + 5, output_vocab_size=text_offset, **sub),
        coarse_acoustics_config=dict(input_vocab_size=coarse_vocab, output_vocab_size=coarse_vocab, **sub),
        fine_acoustics_config=dict(input_vocab_size=codebook + 1, output_vocab_size=codebook + 1, n_codes_total=8,
                                   n_codes_given=1, **sub),
        codec_config=EncodecConfig(hidden_size=16, num_filters=4, codebook_size=codebook).to_dict(),
    )
    torch.manual_seed(seed)
    model = BarkModel(config).eval()
    generation = BarkGenerationConfig(
        semantic_config=dict(eos_token_id=semantic_vocab, semantic_vocab_size=semantic_vocab,
                             text_encoding_offset=text_offset, text_pad_token=text_offset + text_vocab,
                             semantic_infer_token=text_offset + text_vocab + 4, max_new_tokens=768),
        coarse_acoustics_config=dict(coarse_semantic_pad_token=semantic_vocab + 2 * codebook,
                                     coarse_infer_token=semantic_vocab + 2 * codebook + 2),
        fine_acoustics_config=dict(max_fine_input_length=128, max_fine_history_length=64),
        codebook_size=codebook,
    )
    # BarkModel.generate reads the nested configs as dicts (as they are when loaded from JSON).
    for key in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        setattr(generation, key, getattr(generation, key).to_dict())
    model.generation_config = generation
    bias_semantic_eos(model.semantic, semantic_vocab, eos_bias)
    randomize_codebooks(model.codec_model, seed)
    return BarkTTS(model, tokenizer)


def bias_semantic_eos(semantic: Any, eos: int, bias: float) -> None:
    """Give the semantic head (bias-free in Bark) a bias that is ``bias`` on EOS and 0 elsewhere."""
    head = semantic.lm_head
    biased = torch.nn.utils.skip_init(torch.nn.Linear, head.in_features, head.out_features)  # no draw from the RNG
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos] = bias
    semantic.lm_head = biased


def tiny_musicgen(seed: int = 0):
    """A random-initialised MusicgenForConditionalGeneration of the real classes: a 2-layer T5 encoder, a
    2-layer decoder over 4 codebooks of 64 codes, and an EnCodec at MusicGen's 32 kHz / 50 Hz framing."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    tokenizer = tiny_tokenizer()
    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    pad_token_id=tokenizer.pad_token_id)
    # 4 codebooks of 64 codes (6 bits) at 50 Hz = 1.2 kbps; upsampling 8*5*4*4 = 640 samples per frame at 32 kHz
    codec = EncodecConfig(target_bandwidths=[1.2], sampling_rate=32000, audio_channels=1, hidden_size=32,
                          num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=64,
                          codebook_dim=32, num_lstm_layers=1, use_causal_conv=False, normalize=False)
    decoder = MusicgenDecoderConfig(vocab_size=64, num_codebooks=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, ffn_dim=64, max_position_embeddings=2048,
                                    pad_token_id=64, decoder_start_token_id=64, bos_token_id=64)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config.update(decoder_start_token_id=64, pad_token_id=64, bos_token_id=64)
    randomize_codebooks(model.audio_encoder, seed)
    return model, tokenizer


def tiny_ace_step(seed: int = 0):
    """A random-initialised AceStepPipeline of the real classes: a 2-layer DiT, condition encoder, a Qwen3
    text encoder over the locally built tokenizer and a small Oobleck VAE (25 latents/s, 4 kHz stereo)."""
    from diffusers import (AceStepConditionEncoder, AceStepPipeline, AceStepTransformer1DModel, AutoencoderOobleck,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_tokenizer()
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0, sliding_window=16)
    torch.manual_seed(seed)
    transformer = AceStepTransformer1DModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2, in_channels=24,
                                            audio_acoustic_hidden_dim=8, patch_size=2, **heads)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          vocab_size=len(tokenizer), max_position_embeddings=4096,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    condition_encoder = AceStepConditionEncoder(hidden_size=32, intermediate_size=64, text_hidden_dim=32,
                                                timbre_hidden_dim=8, num_lyric_encoder_hidden_layers=2,
                                                num_timbre_encoder_hidden_layers=2, **heads)
    vae = AutoencoderOobleck(encoder_hidden_size=6, downsampling_ratios=[4, 5, 8], decoder_channels=3,
                             decoder_input_channels=8, audio_channels=2, channel_multiples=[1, 2, 4],
                             sampling_rate=4000)
    # ACE-Step feeds the DiT timesteps in [0, 1] and computes its own shifted schedule (diffusers docstring)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    pipe = AceStepPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition_encoder, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
