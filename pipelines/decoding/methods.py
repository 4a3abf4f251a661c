"""The text tab's decoding methods: each one's label and how a request gets its drafter over the model's shared
``DecodingState``. One verifier, many drafters: a new method is its drafter's module plus one entry in
``DECODING_METHODS``, and the tab, the UI's method list and the benchmarks pick it up from here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..base import PipelineError, require_choice
from .drafters.draft_model import DraftModel
from .drafters.lookahead import LookaheadConfig, LookaheadTrie
from .drafters.prompt_lookup import PromptLookup
from .drafters.prompt_tokens import ParallelPromptDecoding
from .drafters.recurrent_drafter import RecurrentDrafting
from .drafters.recycling_lookup import LOOKUP_TOKENS, RecyclingLookup
from .hardware import DraftingCost, pick_tree_size
from .sliding import UnsupportedAttention, attention_layout
from .static import StaticForward
from .verify import Drafter

if TYPE_CHECKING:
    from ..tabs.text import TextPipeline, TextRequest
    from .causal_lm import CausalLM

DrafterFactory = Callable[["TextPipeline", "CausalLM", "TextRequest", "StaticForward | None"], Drafter]


@dataclass(frozen=True)
class Method:
    """A decoding method of the tab: its label and how a request gets its drafter (None: plain decoding)."""
    label: str
    drafter: DrafterFactory | None = None

    @property
    def short(self) -> str:
        return self.label.split(" (")[0]


def merged_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                   forward: StaticForward | None) -> Drafter:
    return lm.state.merged(lm.state.step_costs(request.tree_profile, forward))


def recurrent_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    require_trained(pipeline, lm.state.head, request, "draft head", "recurrent_training")
    return RecurrentDrafting(lm.state.head, lm.model, lm.state.step_costs(request.tree_profile, forward),
                             host=DraftingCost())


def ppd_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest, forward: StaticForward | None) -> Drafter:
    require_trained(pipeline, lm.state.prompts, request, "prompt tokens", "prompt_training")
    return ParallelPromptDecoding(lm.state.prompts, lm.state.step_costs(request.tree_profile, forward))


def recycling_nodes(lm: CausalLM, request: TextRequest, forward: StaticForward | None) -> int:
    """The tree size this device affords at the model's measured recycling acceptance."""
    return pick_tree_size(lm.state.recycler().acceptance_rates(), lm.state.step_costs(request.tree_profile, forward))


def recycling_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    recycler = lm.state.recycler()
    recycler.resize(recycling_nodes(lm, request, forward))
    return recycler


def recycling_lookup_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                             forward: StaticForward | None) -> Drafter:
    """The template at the size this device affords less the chain's tokens, so the tree keeps its priced size."""
    recycler = lm.state.recycler(request.method)
    recycler.resize(max(1, recycling_nodes(lm, request, forward) - LOOKUP_TOKENS))
    return RecyclingLookup(recycler)


def lookahead_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                      forward: StaticForward | None) -> Drafter:
    # alipay's 64-node budget, never more than this device affords
    nodes = min(LookaheadConfig.decoding_length, recycling_nodes(lm, request, forward))
    return LookaheadTrie(LookaheadConfig(decoding_length=nodes), lm.state.trie())


def draft_model_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                        forward: StaticForward | None) -> Drafter:
    return DraftModel(pipeline.load_draft(lm, request).model)


# The tab's decoding methods: a new one is its drafter's module plus one entry here.
DECODING_METHODS: dict[str, Method] = {
    "vanilla": Method("Vanilla (one token per forward)"),
    "merged": Method("Merged (prompt lookup + Lookahead + Token Recycling + a trained draft head or PPD prompt "
                     "tokens, in one tree)", merged_drafter),
    "redrafter": Method("Recurrent Drafter (trained draft head)", recurrent_drafter),
    "ppd": Method("Parallel Prompt Decoding (trained prompt tokens)", ppd_drafter),
    "recycling": Method("Token Recycling", recycling_drafter),
    "recycling_lookup": Method("Token Recycling + prompt lookup (one tree; on a GPU drafted and verified on the device)",
                               recycling_lookup_drafter),
    "lookahead": Method("Lookahead (trie)", lookahead_drafter),
    "prompt_lookup": Method("Prompt lookup", lambda pipeline, lm, request, forward: PromptLookup()),
    "draft_model": Method("Draft model", draft_model_drafter),
}
METHODS = tuple(DECODING_METHODS)
METHOD_LABELS = {name: method.label for name, method in DECODING_METHODS.items()}
# which trained weights a request drafted with, in every result's stats (each drafter's ``trained_used``)
TRAINED_STATS = {"draft_head": False, "ppd_prompt_tokens": False}


def require_method(name: str) -> Method:
    """The registered method ``name``, or an error listing the ones there are."""
    require_choice(name, "decoding method", DECODING_METHODS)
    return DECODING_METHODS[name]


def build_drafter(pipeline: TextPipeline, lm: CausalLM, request: TextRequest,
                  forward: StaticForward | None = None) -> Drafter | None:
    """The request's method's drafter, or None for plain decoding; a model whose attention a tree cannot go
    through (``sliding.UnsupportedAttention``) gets a clear error naming the method and the model."""
    method = require_method(request.method)
    if method.drafter is None:
        return None
    try:
        attention_layout(lm.model)
    except UnsupportedAttention as error:
        raise PipelineError(f"{method.label} cannot decode {pipeline.spec_for(request.model).name!r}: "
                            f"{error} Pick Vanilla for this model.") from error
    return method.drafter(pipeline, lm, request, forward)


def require_trained(pipeline: TextPipeline, weights: Any, request: TextRequest, what: str, command: str) -> None:
    """Stop with how to train them when ``weights`` (a trained drafter's) are missing for the model."""
    if weights is None:
        raise PipelineError(
            f"No trained {what} for {pipeline.spec_for(request.model).name!r}, so "
            f"{DECODING_METHODS[request.method].short} cannot draft with it. Train once on a GPU (python -m "
            f"pipelines.decoding.training.{command} --model MODEL, which writes them where this tab looks) or "
            "pick another method.")
