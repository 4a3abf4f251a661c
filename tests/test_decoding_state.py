"""A model's decoding state: trained weights are loaded once, the merged drafter follows them, cost curves are
measured once."""
from __future__ import annotations

import torch

from pipelines.decoding import hardware, state as decoding_state
from pipelines.decoding.drafters.prompt_tokens import new_prompt_tokens
from pipelines.decoding.drafters.recurrent_drafter import new_head
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
    assert merged.recycler.matrix is state.recycler("merged").matrix and merged.lookahead.trie is state.trie("merged")
    assert state.recycler("merged") is not state.recycler() and state.trie("merged") is not state.trie()


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


def test_trained_weights_are_read_once_per_model_state_and_use_overrides_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWORKS_CACHE", str(tmp_path))
    model, name = tiny_causal_lm("llama", seed=3), "someone/Tiny-Llama"
    new_prompt_tokens(model, model_name=name).save(decoding_state.TRAINED["prompts"].default_out(name))
    new_head(model, name, torch.tensor([5, 9, 7])).save(decoding_state.TRAINED["head"].default_out(name))
    reads = []
    for weights in decoding_state.TRAINED.values():
        def counted(path, m, load=weights.load):
            reads.append(path.name)
            return load(path, m)
        monkeypatch.setattr(weights, "load", counted)
    state = DecodingState(model)
    state.load_trained(name)
    prompts, head = state.prompts, state.head
    assert prompts.model_name == name and head.vocab.tolist() == [5, 9, 7] and len(reads) == 2
    state.load_trained(name)
    assert state.prompts is prompts and state.head is head and len(reads) == 2  # kept, not read again
    state.use(head=None)
    state.load_trained(name)
    assert state.head is None and state.prompts is prompts and len(reads) == 2
    other = DecodingState(model)  # another loaded model finds its own, except what ``use`` set before
    other.use(prompts=None)
    other.load_trained(name)
    assert other.prompts is None and other.head is not head and other.head.vocab.tolist() == [5, 9, 7]
    assert reads[2:] == ["redrafter-tiny-llama.safetensors"]
    unnamed = DecodingState(model)
    unnamed.load_trained("")
    assert unnamed.prompts is None and unnamed.head is None and len(reads) == 3
