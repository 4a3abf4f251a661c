"""Which forward serves a text request, built once per model and kept with it: the static CUDA-graph step
(``static.StaticForward``), exact mode's adapter (``exact.ExactForward``), or None for the stock DynamicCache.
Here, not in the tab, because the choice follows the device, the environment (``settings``) and the model's
attention layout, and an adapter is rebuilt only when the request no longer fits it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .. import settings
from ..base import PipelineError
from .exact import EXACT_BLOCK, EXACT_ROWS, ExactForward
from .sliding import UnsupportedAttention, attention_layout
from .static import BUCKETS, COMPILE_MODES, StaticForward, capture_supported

if TYPE_CHECKING:
    from .causal_lm import CausalLM

# what the first request's progress line says about the wait (text_served_h100.json / _layers16_h100.json: 206 s
# for the whole step and 23.5 s for whole layers on an H100 for SmolLM2-135M; norms and MLPs compile in less)
COMPILE_WAIT = {"layers": "; compiling takes about half a minute)", "dynamic": "; compiling takes minutes)"}


def fast_forward(lm: CausalLM, total_tokens: int) -> StaticForward | None:
    """The static-cache, CUDA-graph step (decoding/static.py) on CUDA; None (stock DynamicCache) elsewhere.

    ``TOKENWORKS_TEXT_FAST``: ``auto`` (default, CUDA only), ``1`` (also on the CPU, uncaptured), ``0`` (off).
    ``TOKENWORKS_TEXT_COMPILE``: ``auto`` (default: ``layers`` where graphs are captured, i.e. CUDA outside
    ZeroGPU), ``layers`` (inductor on the decoder layers' norms and MLPs, one graph per kind for all layers:
    seconds on the first request), ``dynamic`` (the whole step once for every bucket: 206 s on the first request
    for SmolLM2-135M on an H100, benchmarks/results/text_served_h100.json), ``off``/``0``."""
    mode = settings.text_fast()
    if mode == "0" or (mode == "auto" and lm.model.device.type != "cuda"):
        return None
    try:
        attention_layout(lm.model)
    except UnsupportedAttention:
        return None  # chunked or linear layers: the stock cache (vanilla only)
    needed = total_tokens + max(BUCKETS)
    if lm.fast_forward is None or lm.fast_forward.max_cache_len < needed or _stale(lm.fast_forward, lm):
        lm.fast_forward = StaticForward(lm.model, max_cache_len=max(4096, needed),
                                        compile=compile_mode(lm.model.device), embed=_prompt_embedding(lm))
    return lm.fast_forward


def exact_forward(lm: CausalLM, total_tokens: int) -> ExactForward:
    """Exact mode's adapter (decoding/exact.py), on every device. Its cache length is a power of two fixed by
    the request's prompt + new tokens alone, so plain and drafted runs of one request share every shape."""
    try:
        attention_layout(lm.model)
    except UnsupportedAttention as error:
        raise PipelineError(f"Exact mode cannot decode this model: {error} Turn exact mode off.") from error
    length = 1 << (total_tokens + EXACT_BLOCK + EXACT_ROWS - 1).bit_length()  # room for a tree and padding
    if lm.exact_forward is None or lm.exact_forward.max_cache_len != length or _stale(lm.exact_forward, lm):
        lm.exact_forward = ExactForward(lm.model, max_cache_len=length, embed=_prompt_embedding(lm))
    return lm.exact_forward


def _prompt_embedding(lm: CausalLM) -> Callable[[torch.Tensor], torch.Tensor] | None:
    # with prompt tokens every method runs through the embedding that also maps them (real ids: the
    # model's own lookup, bit for bit), so one set of captured graphs serves every method
    return lm.state.prompts.embedding(lm.model) if lm.state.prompts is not None else None


def _stale(forward: StaticForward | ExactForward, lm: CausalLM) -> bool:
    """The adapter was built with (or without) an embedding for prompt tokens the model no longer has (or now has)."""
    return (forward.embed is None) != (lm.state.prompts is None)


def compile_mode(device: torch.device) -> str:
    """``TOKENWORKS_TEXT_COMPILE`` resolved for ``device`` (see ``fast_forward``)."""
    choice = settings.text_compile()
    if choice == "auto":
        return "layers" if capture_supported(device) else "off"
    if choice == "0":
        return "off"
    if choice not in COMPILE_MODES:
        raise PipelineError(f"TOKENWORKS_TEXT_COMPILE must be auto, 0 or one of {', '.join(COMPILE_MODES)}; "
                            f"got {choice!r}.")
    return choice


def first_request_note(forward: StaticForward | ExactForward) -> str:
    """The progress line while the first request compiles and captures the GPU step."""
    wait = COMPILE_WAIT.get(getattr(forward, "compile_mode", "off"), ")")
    return f"preparing the decode step for this GPU (first request only{wait}"
