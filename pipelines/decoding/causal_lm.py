"""A causal LM as the text tab holds it: the model and tokenizer, plus what decoding keeps with the model across
requests (the drafters' ``DecodingState``, the fast-path and exact-mode adapters, one lock). Apart from the tab so
benchmarks load and hold a model exactly the way the served path does."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..models import ModelStore, ResolvedModel
from ..tiny import tiny_causal_lm, tiny_tokenizer
from .exact import ExactForward
from .state import DecodingState
from .static import StaticForward


@dataclass
class CausalLM:
    model: Any
    tokenizer: Any
    fast_forward: StaticForward | None = None  # the GPU fast path's adapter, built on first use, lives with the model
    exact_forward: ExactForward | None = None  # exact mode's adapter, likewise
    state: DecodingState = field(init=False)  # what the drafters share across requests (decoding/state.py)
    # the drafters' state and the static cache are the model's shared state: one decode at a time
    # (a stopped request's worker thread finishes its current step before the next request may start)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.state = DecodingState(self.model)

    @property
    def components(self) -> dict[str, Any]:
        return {"model": self.model}


def load_causal_lm(resolved: ResolvedModel, store: ModelStore) -> CausalLM:
    """Load tokenizer and model from wherever the store resolved them (or build a tiny one)."""
    if resolved.source == "tiny":
        family = resolved.spec.option("family", "llama")
        return CausalLM(tiny_causal_lm(family).to(store.device), tiny_tokenizer())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolved.location
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=store.dtype, attn_implementation="sdpa", trust_remote_code=False, use_safetensors=None
    )
    return CausalLM(model.to(store.device).eval(), tokenizer)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's and the tokenizer's (chat models often list several)."""
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
