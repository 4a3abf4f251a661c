"""What a loaded model's drafters keep across requests, in one object kept with the model: Token Recycling's
matrix and counts (the paper's hot start), the Lookahead output trie (alipay's global output frequencies), the
merged drafter's acceptance counts, the measured cost curves and the trained prompt tokens / draft head (loaded
once per model, here: ``trained.TrainedWeights`` only finds and reads them). The caller holds the model's lock:
one decode at a time reads and updates it.

Each method has its own matrix and trie (the merged drafter its own pair): a memory shared between methods
drafts one method's request from another method's answer to the same prompt, which turns a side-by-side of two
methods into a replay (on an H100, the merged drafter's tau was 6.1 when Lookahead had answered the same prompts
first and 3.2 alone)."""
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
    _recyclers: dict[str, TokenRecycling] = field(default_factory=dict)  # method -> its recycling memory
    _tries: dict[str, NGramTrie] = field(default_factory=dict)  # method -> its output trie
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

    def recycler(self, method: str = "recycling") -> TokenRecycling:
        """``method``'s Token Recycling drafter (matrix and acceptance counts) for this model, created on first use."""
        if method not in self._recyclers:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._recyclers[method] = TokenRecycling(cold_matrix(vocab, next(self.model.parameters()).device))
        return self._recyclers[method]

    def trie(self, method: str = "lookahead") -> NGramTrie:
        """``method``'s Lookahead output trie for this model, created on first use."""
        if method not in self._tries:
            self._tries[method] = NGramTrie(LookaheadConfig.max_nodes)
        return self._tries[method]

    def step_costs(self, profile: str = "auto", forward: CausalLMForward | None = None) -> dict[int, float]:
        """``hardware.step_costs`` for this model, each curve measured once and kept here."""
        return step_costs(self.model, profile, forward, self.curves)

    def merged(self, costs: dict[int, float]) -> MergedDrafter:
        """The model's merged drafter over its own recycling matrix and output trie, its acceptance counts kept
        across requests; it drafts with the draft head when there is one (while it pays for its time), else with
        the prompt tokens."""
        if self._merged is None:
            self._merged = new_merged(self.recycler("merged"), self.trie("merged"), costs, ledger=HeadLedger(),
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
