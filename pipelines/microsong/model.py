"""Micro-song's note model: a small Llama (stock ``LlamaForCausalLM``) over the tune language of ``tunes``, with a
word-level tokenizer built here from that vocabulary (no download), and how the song tab loads it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "weights"
PARTS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one id per word of ``tunes.VOCABULARY`` (ids in its order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tunes import VOCABULARY

    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")


def model_config(size: str = "small"):
    """The note model's shape: ``small`` (~1.2 M parameters, the committed one: what two CPU cores train in minutes)
    or ``tiny`` (tests)."""
    from transformers import LlamaConfig

    from .tunes import VOCABULARY

    hidden, layers, heads, inner = {"small": (160, 4, 4, 416), "tiny": (32, 2, 2, 64)}[size]
    return LlamaConfig(vocab_size=len(VOCABULARY), hidden_size=hidden, intermediate_size=inner,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, rms_norm_eps=1e-5)


def packaged_folder() -> str | None:
    """The committed weights folder, or None while a part is missing (the model is then not available)."""
    return str(WEIGHTS) if all((WEIGHTS / part).is_file() for part in PARTS) else None


@dataclass
class NoteModel:
    """The loaded note model and its tokenizer (what the song tab's ModelStore keeps)."""
    model: Any
    tokenizer: Any

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}


def tiny_note_model(seed: int = 0) -> NoteModel:
    """A random-initialised tiny note model (tests, the tiny preset)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return NoteModel(LlamaForCausalLM(model_config("tiny")).eval(), build_tokenizer())


def load_note_model(resolved, store) -> NoteModel:
    """The ModelStore loader: the committed folder (fp32: the model is small and runs fine on a CPU), or a tiny
    random one for the tiny preset."""
    if resolved.source == "tiny":
        note = tiny_note_model()
        note.model.to(store.device)
        return note
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(resolved.location, attn_implementation="sdpa")
    return NoteModel(model.to(store.device).eval(), AutoTokenizer.from_pretrained(resolved.location))
