"""Micro-world v3's text readout: the UNet is conditioned on the word tokens only.

Why (issue 22): v2's UNet read the prompt through its end tokens -- with a causal encoder, EOT and the padding
after it carry the pooled sentence, and 72-84 % of cross-attention mass sat there, words getting 0-3 % -- so the
token-level controls (ToMe binding, LPA, the leakage fix), which act on word keys and values, had nothing to act
on. Here every position from the first end token on is zero. SD's ``to_k``/``to_v`` have no bias, so a zero state
is a key with logit 0 and a zero value: a content-free sink, as T5-conditioned models mask their padding, and the
UNet must read words. The causal failures the controls repair stay: the first object's attribute still leaks into
later words, and a style phrase written last still cannot reach earlier content words.

A saved folder's ``model_index.json`` names the class as ``["pipelines.microworld.word_readout",
"WordReadoutCLIPTextModel"]``, which the stock ``StableDiffusionPipeline.from_pretrained`` loads once this module
is imported (diffusers resolves a module path from ``sys.modules`` only and never imports what a folder names): the
image tab's loader does that (``diffusion.models.import_own_components``), a script imports it itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
# PreTrainedModel in this namespace: diffusers picks a custom component's load method by looking the base classes
# up by name in the component's own module.
from transformers import CLIPTextModel, PreTrainedModel  # noqa: F401
from transformers.modeling_outputs import BaseModelOutputWithPooling


def word_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[batch, tokens] bool: True before each row's first end token (BOS and the words). The FIRST one: the
    tokenizer pads with the end token. A row without one (never made by ``CLIPTokenizer``) keeps every position."""
    is_end = input_ids == eos_token_id
    first = torch.where(is_end.any(-1), is_end.int().argmax(-1), input_ids.shape[-1])
    return torch.arange(input_ids.shape[-1], device=input_ids.device) < first[:, None]


class WordReadoutCLIPTextModel(CLIPTextModel):
    """``CLIPTextModel`` whose token states are zero from the first end token on: ``last_hidden_state`` and every
    ``hidden_states`` entry, so an earlier layer's read (clip skip) is as content-free there (diffusers' clip-skip
    path then applies the final LayerNorm, whose output at a zero state is its bias: constant, not zero).
    ``pooler_output`` (the EOT state) is unchanged."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        return_dict = kwargs.pop("return_dict", None)
        out = super().forward(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        ends = ~word_positions(input_ids.view(-1, input_ids.shape[-1]), self.config.eos_token_id)[..., None]
        out.last_hidden_state = out.last_hidden_state.masked_fill(ends, 0)
        if out.hidden_states is not None:
            out.hidden_states = tuple(states.masked_fill(ends, 0) for states in out.hidden_states)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


READOUTS = ("all", "words")  # the UNet reads every position (v2) | the word tokens only (v3)


def readout_class(readout: str) -> type[CLIPTextModel]:
    return WordReadoutCLIPTextModel if readout == "words" else CLIPTextModel


def with_readout(encoder: CLIPTextModel, readout: str) -> CLIPTextModel:
    """``encoder``'s weights (frozen, same device and dtype) read out as ``readout``: a plain ``CLIPTextModel`` for
    ``all``, a ``WordReadoutCLIPTextModel`` for ``words``; ``encoder`` itself when it already is one."""
    cls = readout_class(readout)
    if type(encoder) is cls:
        return encoder
    parameter = next(encoder.parameters())
    converted = cls(encoder.config)
    converted.load_state_dict(encoder.state_dict())
    return converted.to(parameter.device, parameter.dtype).requires_grad_(False).eval()


def folder_readout(folder: Path) -> str:
    """The readout of a folder saved by ``train_v2``: its text encoder's saved class (``architectures``, which
    ``save_pretrained`` writes and the folder's ``model_index.json`` matches); ``all`` when it has no text encoder."""
    config = folder / "text_encoder" / "config.json"
    if not config.is_file():
        return "all"
    return "words" if WordReadoutCLIPTextModel.__name__ in (json.loads(config.read_text()).get("architectures") or
                                                           []) else "all"
