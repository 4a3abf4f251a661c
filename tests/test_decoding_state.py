"""A model's decoding state: the merged drafter follows its trained weights, cost curves are measured once."""
from __future__ import annotations

from pipelines.decoding import hardware
from pipelines.decoding.prompt_tokens import new_prompt_tokens
from pipelines.decoding.recurrent_drafter import new_head
from pipelines.decoding.state import DecodingState
from pipelines.tiny import tiny_causal_lm

from decoding_support import FLAT


def test_the_merged_drafter_takes_the_head_where_there_is_one_else_the_prompt_tokens():
    model = tiny_causal_lm("llama", seed=3)
    state = DecodingState(model)
    merged = state.merged(FLAT)
    assert merged.chains is None and merged.drafts is None
    state.prompts = new_prompt_tokens(model)
    assert state.merged(FLAT).chains.prompts is state.prompts and merged.drafts is None
    state.head = new_head(model)
    assert state.merged(FLAT).drafts.head is state.head and merged.chains is None
    state.head = state.prompts = None
    assert state.merged(FLAT) is merged and merged.chains is None and merged.drafts is None
    assert merged.recycler.matrix is state.recycler().matrix and merged.lookahead.trie is state.trie()


def test_each_cost_curve_is_measured_once_per_model_state(monkeypatch):
    calls = []

    def measure(model, sizes, forward=None, **options):
        calls.append(sizes)
        return {1: 1.0, 4: 2.0}

    monkeypatch.setattr(hardware, "measure_step_cost", measure)
    model = tiny_causal_lm("llama", seed=0)
    model.config._name_or_path = ""  # unnamed: nothing stored across processes
    state = DecodingState(model)
    assert state.step_costs() == state.step_costs() == {1: 1.0, 4: 2.0}
    assert len(calls) == 1 and state.curves == {(): {1: 1.0, 4: 2.0}}
    DecodingState(model).step_costs()
    assert len(calls) == 2  # another loaded model measures its own
