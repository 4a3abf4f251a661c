"""Recurrent Drafter: the head's tree from the model's own features, merged or alone, lossless; training."""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.recurrent_drafter import (DraftHead, HeadDrafts, RecurrentDrafting, head_for,
                                                           lm_head_logits, load_head, trained_path)
from pipelines.decoding.training.recurrent_training import HeadConfig, frequent_vocab, head_batch, train
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import CausalLMForward, Drafter, speculative_decode
from pipelines.tiny import tiny_causal_lm, tiny_tokenizer

from decoding_support import (FAMILIES, FLAT, STEEP, assert_identical_to_greedy, assert_sampling_reproduced,
                              random_head, repetitive_prompt, root_path, run,
                              sharpened_llama, tree_logits, weights_unchanged)


def head_drafters(model):
    head = random_head(model)
    return {
        "redrafter_flat": RecurrentDrafting(head, model, FLAT),
        "redrafter_steep": RecurrentDrafting(head, model, STEEP),
        "merged_head_flat": new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), FLAT,
                                       drafts=HeadDrafts(head, model)),
        "merged_head_steep": new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), STEEP,
                                        drafts=HeadDrafts(head, model, vocab=64)),
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed,length", [(0, 5), (1, 23), (2, 61)])
def test_head_drafters_are_identical_to_greedy(models, family, seed, length):
    model = models[family]
    assert_identical_to_greedy(model, repetitive_prompt(seed, length), lambda: head_drafters(model))


def test_sampling_with_the_head_reproduces_plain_sampling(models):
    assert_sampling_reproduced(models["llama"], head_drafters(models["llama"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forward_hands_over_the_lm_heads_input_for_every_node(models, family):
    model = models[family]
    context = repetitive_prompt(4, 9)[0].tolist()
    tree = TokenTree([context[-1], 11, 12, 13], [-1, 0, 0, 2])
    forward = CausalLMForward(model)
    forward.record_hidden = True
    logits = tree_logits(forward, context, tree)
    assert forward.hidden.shape == (len(tree), model.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(lm_head_logits(model, forward.hidden), logits, atol=1e-5, rtol=1e-4)
        for node in range(len(tree)):
            ids = torch.tensor([context[:-1] + root_path(tree, node)])
            plain = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(forward.hidden[node], plain, atol=1e-5, rtol=1e-4)


def test_the_static_path_hands_over_the_same_features(models):
    from pipelines.decoding.static import StaticForward

    model = models["llama"]
    context = repetitive_prompt(5, 12)[0].tolist()
    tree = TokenTree([context[-1], 11, 12, 13, 14], [-1, 0, 1, 0, 3])
    eager, static = CausalLMForward(model), StaticForward(model, max_cache_len=128, buckets=(1, 8, 32), capture=False)
    for forward in (eager, static):
        forward.record_hidden = True
        cache = forward.new_cache()
        with torch.inference_mode():
            forward(context[:-1], torch.arange(len(context) - 1)[None], None, cache)
            past = cache.get_seq_length()
            mask, positions = forward.block_inputs(tree, 0, past)
            forward(tree.tokens, positions, mask, cache, keep=len(tree))
    torch.testing.assert_close(static.hidden, eager.hidden, atol=1e-5, rtol=1e-4)
    prompt = repetitive_prompt(2, 30)
    reference = run(plain_decode(model, prompt, 30, SamplingConfig(), set()))
    static = StaticForward(model, max_cache_len=512, buckets=(1, 8, 32, 128), capture=False)
    for name, drafter in head_drafters(model).items():
        assert run(speculative_decode(model, prompt, 30, SamplingConfig(), set(), drafter,
                                      forward=static)) == reference, name


def test_candidates_follow_the_head_recursion_from_the_last_accepted_nodes_features(models):
    """Each node's probability is the head's, given the states of its own path (s_0 = h, one advance per
    token from the root down), and the tree is best first."""
    model = models["qwen2"]
    head = random_head(model, seed=3)
    drafts = HeadDrafts(head, model, top_k=3, widths=(1, 2, 2))
    rows = torch.randn(4, model.config.hidden_size)
    drafts.read_hidden(rows)
    drafts.update(TokenTree([9, 21, 22, 23], [-1, 0, 1, 0]).path_of([21, 22, 40])[-1])  # nodes 1, 2, then the bonus
    assert torch.equal(drafts.anchor, rows[2])
    tree, ranks, conditional, path = drafts.candidates(40, 100)
    assert len(tree) == 1 + 3 + 2 * 3 + 2 * 3 and tree.tokens[0] == 40
    assert path == sorted(path, reverse=True)
    embedding = model.get_input_embeddings()
    with torch.inference_mode():
        for node in range(1, len(tree)):
            tokens = root_path(tree, node)
            state = rows[2]
            for token in tokens[:-1]:
                state = head.advance(state[None], embedding(torch.tensor([token])))[0]
            probs = lm_head_logits(model, head.readout(state[None], rows[2][None]))[0].softmax(-1)
            assert conditional[node] == pytest.approx(float(probs[tokens[-1]]), rel=1e-4)
            assert path[node] == pytest.approx(path[tree.parents[node]] * conditional[node])
            assert ranks[node] == int((probs > probs[tokens[-1]]).sum())
    assert len(drafts.candidates(40, 5)[0]) == 5


def test_small_offers_draft_one_chain_and_the_head_scores_its_vocabulary_only(models):
    model = models["llama"]
    vocab = torch.arange(100, 164)
    drafts = HeadDrafts(random_head(model, vocab=vocab), model, vocab=32, narrow_vocab=16)
    assert drafts.plan(16) == [(1, 16)] * 4 and drafts.plan(8) == [(1, 16)] * 3
    assert [width for width, _ in drafts.plan(64)] == list(drafts.widths)
    assert [rows for _, rows in drafts.plan(64)] == [32, 32] + [16] * (len(drafts.widths) - 2)
    drafts.anchor = torch.randn(model.config.hidden_size)
    tree = drafts.candidates(7, 64)[0]
    assert set(tree.tokens[1:]) <= set(range(100, 132))
    deep = {tree.tokens[i] for i in range(len(tree)) if tree.depths[i] > 2}
    assert deep and deep <= set(range(100, 116))
    assert set(drafts.candidates(7, 16)[0].tokens[1:]) <= set(range(100, 116))
    assert HeadDrafts(random_head(model), model).plan(8) == [(1, 320)] * 3  # no frequency order: every row


def test_merged_drafter_takes_the_heads_tree_as_a_source(models):
    model = models["llama"]
    drafts = HeadDrafts(random_head(model), model)
    drafter = new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), FLAT, drafts=drafts)
    assert drafter.reads_hidden and not Drafter.reads_hidden
    drafter.start([5, 6, 7])
    drafts.anchor = torch.randn(model.config.hidden_size)
    tree = drafter.propose([5, 6, 7])
    heads = {tuple(root_path(drafter.proposed, node)[1:]) for node, ids in enumerate(drafter.sources)
             if any(drafter.buckets[b][0] == "redrafter" for b in ids)}
    head_tree = drafts.candidates(7, drafter.offer)[0]
    assert heads and heads <= {tuple(root_path(head_tree, i)[1:]) for i in range(1, len(head_tree))}
    assert len(tree) > 1
    drafter.costs, drafter.kept = STEEP, 2.0  # a CPU's small trees: the head's levels would cost more than they add
    drafter.propose([5, 6, 7])
    assert drafter.offer < 64
    assert not any(bucket[0] == "redrafter" for bucket in drafter.buckets)
    assert not drafter.reads_hidden  # so the next request's forwards do not record features at all
    prompt = repetitive_prompt(3, 20)
    reference = run(plain_decode(model, prompt, 20, SamplingConfig(), set()))
    assert run(speculative_decode(model, prompt, 20, SamplingConfig(), set(), drafter)) == reference


def test_heads_are_found_by_model_name_and_checked_against_the_model(models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWORKS_CACHE", str(tmp_path))
    model = models["llama"]
    assert trained_path("someone/Unknown-Model") is None
    head = random_head(model, vocab=torch.tensor([5, 9, 7]))
    head.model_name = "someone/Tiny-Llama"
    path = tmp_path / "draft_heads" / "redrafter-tiny-llama.safetensors"
    head.save(path)
    assert trained_path("someone/Tiny-Llama") == path
    loaded = load_head(path, model)
    assert loaded.vocab.tolist() == [5, 9, 7] and loaded.model_name == "someone/Tiny-Llama"
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name],
                                   tensor.half().to(tensor.dtype) if tensor.is_floating_point() else tensor)
    other = tmp_path / "other.safetensors"
    DraftHead(48, model_name="someone/Narrower").save(other)
    with pytest.raises(ValueError, match="trained for 'someone/Narrower'"):
        load_head(other, model)
    with pytest.raises(ValueError, match="vocabulary 4"):
        load_head(path, tiny_causal_lm("llama", seed=0, vocab_size=4))
    assert head_for(tiny_causal_lm("llama", seed=0), "someone/Tiny-Llama").vocab.tolist() == [5, 9, 7]
    assert head_for(model, "") is None and head_for(model, "someone/Unknown-Model") is None


def test_head_batch_anchors_answer_positions_with_a_next_token():
    batch = head_batch([([5, 6, 7, 8, 9], 2), ([4, 3, 2], 1)], anchors=10, rng=random.Random(0),
                       device=torch.device("cpu"))
    width = batch["tokens"].shape[1]
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 0, 0]]
    assert batch["mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    anchors = [(a // width, a % width) for a in batch["anchors"].tolist()]
    assert anchors == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert batch["following"].tolist() == [3, 2, 1, 2, 1]
    assert frequent_vocab([([1, 2, 2, 3, 3, 3], 1)], 2).tolist() == [3, 2]


def test_training_moves_only_the_head_and_teaches_it_the_models_next_tokens():
    model = sharpened_llama()
    rng = random.Random(0)
    data = []
    for _ in range(48):  # the model's own greedy continuations, as the self-instructed data are
        prompt = torch.tensor([[rng.randrange(5, 320) for _ in range(6)]])
        data.append((prompt[0].tolist() + run(plain_decode(model, prompt, 18, SamplingConfig(), set())), 6))
    config = HeadConfig(model="tiny", device="cpu", depth=3, vocab=0, batch=8, anchors=12, epochs=12, lr=1e-2,
                        holdout=0.2)
    with weights_unchanged(model):
        head, report = train(model, tiny_tokenizer(), config, data=data)
    assert report["loss_last"] < report["loss_first"]
    assert sum(report["holdout_after"]["kl"]) < sum(report["holdout_before"]["kl"])
    assert report["holdout_after"]["top1"][0] > report["holdout_before"]["top1"][0]
    assert isinstance(head, DraftHead) and not any(p.requires_grad is False for p in head.parameters())


def test_the_next_steps_head_starts_as_soon_as_a_step_is_accepted(models):
    """The head is launched in ``update`` (its levels overlap the rest of the step on a GPU) and ``propose`` reads
    that launch instead of starting another: one launch per step, and still the plain greedy output."""
    model = models["llama"]
    drafter = RecurrentDrafting(random_head(model), model, FLAT)
    phase, launches = [""], []
    for name in ("propose", "update"):
        def phased(*args, _method=getattr(drafter, name), _name=name):
            phase[0] = _name
            return _method(*args)
        setattr(drafter, name, phased)
    launch = drafter.drafts.launch
    drafter.drafts.launch = lambda root, max_nodes: launches.append(phase[0]) or launch(root, max_nodes)
    prompt = repetitive_prompt(3, 20)
    got = run(speculative_decode(model, prompt, 30, SamplingConfig(), set(), drafter))
    assert got == run(plain_decode(model, prompt, 30, SamplingConfig(), set()))
    assert launches.count("propose") == 1 and launches.count("update") == len(launches) - 1 > 3
