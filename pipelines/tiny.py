"""Tiny random-initialised models of the real classes, with tokenizers built locally (no downloads).

Used by the ``tiny`` preset and by the tests, the way transformers and diffusers test themselves.
"""
from __future__ import annotations

from functools import lru_cache

import torch

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


def tiny_causal_lm(family: str = "llama", seed: int = 0, vocab_size: int = 320, attn: str = "sdpa"):
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
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()
