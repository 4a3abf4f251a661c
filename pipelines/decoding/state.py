"""What a loaded model's drafters share across requests, in one object kept with the model: Token Recycling's
matrix and counts (the paper's hot start), the Lookahead output trie (alipay's global output frequencies), the
merged drafter's acceptance counts, the measured cost curves and the trained prompt tokens / draft head (loaded
once per model, here: ``trained.TrainedWeights`` only finds and reads them). The caller holds the model's lock:
one decode at a time reads and updates it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .drafters import prompt_tokens, recurrent_drafter
from .drafters.lookahead import LookaheadConfig, NGramTrie
from .drafters.merged import HeadLedger, MergedDrafter, new_merged
from .drafters.prompt_tokens import PromptChains, PromptTokens
from .drafters.recurrent_drafter import DraftHead, HeadDrafts
from .drafters.recycling import TokenRecycling, cold_matrix
from .hardware import DraftingCost, step_costs
from .trained import TrainedWeights
from .verify import CausalLMForward

# DecodingState's trained-weight fields and where each is found for a model id
TRAINED: dict[str, TrainedWeights] = {"prompts": prompt_tokens.TRAINED, "head": recurrent_drafter.TRAINED}


@dataclass
class DecodingState:
    model: torch.nn.Module
    prompts: PromptTokens | None = None  # PPD's trained prompt tokens for this model, where there are some
    head: DraftHead | None = None  # a trained ReDrafter head for this model, where there is one
    curves: dict[tuple[int, ...], dict[int, float]] = field(default_factory=dict)  # buckets -> measured cost curve
    _recycler: TokenRecycling | None = None
    _trie: NGramTrie | None = None
    _merged: MergedDrafter | None = None
    _settled: set[str] = field(default_factory=set)  # trained fields already looked up (or set by ``use``)

    def load_trained(self, model_name: str) -> None:
        """Find and load the model's trained prompt tokens and draft head (``TRAINED``) on the first call, so
        every request after it reads them from here; a field set by ``use`` is kept."""
        for name, weights in TRAINED.items():
            if name not in self._settled:
                setattr(self, name, weights.load_for(self.model, model_name))
                self._settled.add(name)

    def use(self, **trained: Any) -> None:
        """Set (or clear, with None) ``prompts`` / ``head`` in place of the model's own: tests, or weights
        trained in this process. ``load_trained`` then leaves them as set."""
        for name, value in trained.items():
            if name not in TRAINED:
                raise TypeError(f"DecodingState.use takes {', '.join(TRAINED)}, not {name!r}.")
            setattr(self, name, value)
            self._settled.add(name)

    def recycler(self) -> TokenRecycling:
        """The model's Token Recycling drafter (matrix and acceptance counts), created on first use."""
        if self._recycler is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._recycler = TokenRecycling(cold_matrix(vocab, next(self.model.parameters()).device))
        return self._recycler

    def trie(self) -> NGramTrie:
        """The model's Lookahead output trie, created on first use."""
        if self._trie is None:
            self._trie = NGramTrie(LookaheadConfig.max_nodes)
        return self._trie

    def step_costs(self, profile: str = "auto", forward: CausalLMForward | None = None) -> dict[int, float]:
        """``hardware.step_costs`` for this model, each curve measured once and kept here."""
        return step_costs(self.model, profile, forward, self.curves)

    def merged(self, costs: dict[int, float]) -> MergedDrafter:
        """The model's merged drafter over its recycling matrix and output trie, its acceptance counts kept
        across requests; it drafts with the draft head when there is one (while it pays for its time), else with
        the prompt tokens."""
        if self._merged is None:
            self._merged = new_merged(self.recycler(), self.trie(), costs, ledger=HeadLedger(),
                                      host=DraftingCost())
        drafter = self._merged
        prompts = self.prompts if self.head is None else None
        if (drafter.chains.prompts if drafter.chains is not None else None) is not prompts:
            drafter.chains = PromptChains(prompts) if prompts is not None else None
        if (drafter.drafts.head if drafter.drafts is not None else None) is not self.head:
            drafter.drafts = HeadDrafts(self.head, self.model) if self.head is not None else None
            drafter.ledger = HeadLedger()  # what the old head paid says nothing of this one
        drafter.costs = costs
        return drafter
