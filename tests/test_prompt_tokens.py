"""Parallel Prompt Decoding: prompt-token chains in the verified tree, guesses read back, training."""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.decoding.hardware import bucketed
from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.prompt_tokens import (Guesses, ParallelPromptDecoding, PromptChains, PromptTokens,
                                                       load_prompt_tokens, new_prompt_tokens, prompt_tokens_for,
                                                       trained_path)
from pipelines.decoding.training.prompt_training import TrainConfig, distillation_batch, train
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.trained import weights_name
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import CausalLMForward, speculative_decode
from pipelines.tiny import tiny_causal_lm, tiny_tokenizer

from decoding_support import (FAMILIES, FLAT, STEEP, assert_identical_to_greedy, assert_sampling_reproduced,
                              repetitive_prompt, root_path, run,
                              sharpened_llama, tree_logits, weights_unchanged)

def ppd_drafters(model):
    prompts = new_prompt_tokens(model, count=3, seed=1)
    recycled = TokenRecycling(torch.zeros(320, 8, dtype=torch.long))
    return prompts, {
        "ppd_flat": ParallelPromptDecoding(prompts, FLAT),
        "ppd_steep": ParallelPromptDecoding(prompts, STEEP),
        "merged_ppd_flat": new_merged(recycled, NGramTrie(1000), FLAT, prompts),
        "merged_ppd_steep": new_merged(TokenRecycling(torch.zeros(320, 8, dtype=torch.long)), NGramTrie(1000), STEEP,
                                       prompts),
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed,length", [(0, 5), (1, 23), (2, 61)])
def test_prompt_token_drafters_are_identical_to_greedy(models, family, seed, length):
    model = models[family]
    drafters = assert_identical_to_greedy(model, repetitive_prompt(seed, length), lambda: ppd_drafters(model)[1])
    assert drafters["ppd_flat"].chains.chains > 0 and drafters["merged_ppd_flat"].chains.chains > 0


def test_sampling_with_prompt_tokens_reproduces_plain_sampling(models):
    assert_sampling_reproduced(models["llama"], ppd_drafters(models["llama"])[1])


class Spy(CausalLMForward):
    def __call__(self, ids, position_ids, mask, cache, keep=None):
        self.cache = cache
        self.seen = ids
        return super().__call__(ids, position_ids, mask, cache, keep)


def test_prompt_rows_leave_the_cache_and_virtual_ids_are_never_committed(models):
    model = models["qwen2"]
    prompt = repetitive_prompt(3, 17)
    prompts, drafters = ppd_drafters(model)
    drafter = drafters["ppd_flat"]
    spy = Spy(model, embed=drafter.embedding(model))
    committed, saw_virtual = prompt[0].tolist(), False
    for chunk in speculative_decode(model, prompt, 20, SamplingConfig(), set(), drafter, forward=spy):
        assert all(token < prompts.base for token in chunk)
        saw_virtual |= any(token >= prompts.base for token in spy.seen)
        committed += chunk
        length = spy.cache.get_seq_length()
        with torch.inference_mode():
            fresh = model(torch.tensor([committed[:length]]), use_cache=True).past_key_values
        for ours, theirs in zip(spy.cache.layers, fresh.layers):
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
    assert saw_virtual


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chain_row_sees_its_nodes_path_and_the_chain_before_it(models, family):
    """Logits at p_k below node v equal a plain forward over v's path followed by p_1 … p_k (as embeddings,
    at positions pos(v)+1 … pos(v)+k): the mask and positions of a chain are the paper's."""
    model = models[family]
    prompts = new_prompt_tokens(model, count=3, seed=2)
    embed = prompts.embedding(model)
    context = repetitive_prompt(4, 9)[0].tolist()
    tree = TokenTree([context[-1], 11, 12, 13], [-1, 0, 0, 2])
    chains = PromptChains(prompts)
    tree = chains.attach(tree, [1.0, 0.3, 0.6, 0.5], 2.4, FLAT, 64)
    logits = tree_logits(CausalLMForward(model, embed=embed), context, tree)
    checked = 0
    with torch.inference_mode():
        for node in range(len(tree)):
            if tree.tokens[node] < prompts.base:
                continue
            ids = torch.tensor([context[:-1] + root_path(tree, node)])
            plain = model(inputs_embeds=embed(ids)).logits[0, -1]
            torch.testing.assert_close(logits[node], plain, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == 3 * 4  # a flat curve pays for a chain below every node


def test_guess_tree_is_best_first_over_products_of_guesses():
    guesses = Guesses([[5, 6], [7, 8], [9]], [[0.6, 0.3], [0.5, 0.4], [0.9]])
    tree, ranks, path = guesses.tree(1, 7)
    assert tree.tokens[:4] == [1, 5, 6, 7] and tree.parents[:4] == [-1, 0, 0, 1]
    assert path == sorted(path, reverse=True)
    for i in range(1, len(tree)):
        depth = tree.depths[i] - 1
        assert path[i] == pytest.approx(path[tree.parents[i]] * guesses.probs[depth][ranks[i]])
    assert len(tree) == 7 and len(guesses.tree(1, 100)[0]) == 1 + 2 + 4 + 4


def test_chains_follow_the_cost_curve_and_the_likeliest_end_of_the_path(models):
    prompts = new_prompt_tokens(models["llama"], count=3)
    tree = TokenTree([0, 1, 2, 3], [-1, 0, 1, 0])
    path = [1.0, 0.8, 0.7, 0.1]  # node 2 most likely ends the path (0.7), then the root (0.1), node 3, node 1
    flat = PromptChains(prompts).attach(tree, path, sum(path), FLAT, 128)
    assert len(flat) == 4 + 3 * 4
    first_chain = flat.parents[4]
    assert first_chain == 2 and flat.tokens[4:7] == prompts.ids and flat.parents[5:7] == [4, 5]
    assert len(PromptChains(prompts).attach(tree, path, sum(path), STEEP, 128)) == 4
    assert len(PromptChains(prompts).attach(tree, path, sum(path), FLAT, 10)) == 4 + 3 * 2


def test_a_guess_tree_is_priced_with_the_chain_it_carries(models):
    """On a padded forward the chain alone takes a bare root into the 8-row bucket; guessed nodes that fit beside it
    cost nothing more, so they are verified. (Pricing the tree without its chain kept the bare root and its chain
    on every step: the guesses were read and never verified, tau 1.0 through the served path on an H100.)"""
    prompts = new_prompt_tokens(models["llama"], count=3)
    drafter = ParallelPromptDecoding(prompts, bucketed({1: 1.0, 8: 1.5, 16: 1.6, 128: 2.0}, (1, 8, 16, 128)))
    drafter.start([1, 2])
    drafter.chains.guesses = Guesses([[5, 6, 7], [8, 9], [10]], [[0.3, 0.1, 0.05], [0.3, 0.1], [0.3]])
    tree = drafter.propose([1, 2])
    # the root, 2 guesses and a chain below each take 12 rows, 13 with the row the rule expects re-fed: the 16-row
    # bucket (a 3rd guess and its chain would take the step to the 128-row one)
    assert drafter.chains.real_part(tree) == 3 and tree.tokens[:3] == [2, 5, 6] and len(tree) == 12
    assert tree.tokens[3:6] == prompts.ids and tree.parents[3] == 0  # the first chain: below the likeliest end


def test_a_step_that_verified_no_guesses_leaves_their_worth_alone(models):
    """Guesses too unlikely to verify (a CPU-like curve) say nothing about what guesses are worth: crediting such a
    step with 0 tokens drove the worth down until no chain paid, for the rest of the request."""
    model = models["llama"]
    drafter = ParallelPromptDecoding(new_prompt_tokens(model, count=3), STEEP)
    drafter.start([1, 2])
    drafter.chains.guesses = Guesses([[5], [6], [7]], [[0.01], [0.01], [0.01]])
    tree = drafter.propose([1, 2])
    assert tree.tokens == [2]
    drafter.update(tree, torch.zeros(1, 320), [9])
    assert drafter.chains.gain == 1.0


def test_guesses_come_from_the_chain_below_the_last_accepted_node(models):
    prompts = new_prompt_tokens(models["llama"], count=2)
    chains = PromptChains(prompts, top_k=3)
    tree = chains.attach(TokenTree([0, 1, 2], [-1, 0, 1]), [1.0, 0.5, 0.4], 1.9, FLAT, 64)
    logits = torch.zeros(len(tree), 320)
    below = {tree.parents[i]: i for i in range(len(tree)) if tree.tokens[i] == prompts.ids[0]}
    logits[below[1], 42] = 9.0
    logits[below[1] + 1, 43] = 9.0
    logits[below[2], 50] = 9.0
    chains.read(tree, logits, [1, 77])  # node 1 accepted, then the bonus token
    assert [tokens[0] for tokens in chains.guesses.tokens] == [42, 43]
    chains.read(tree, logits, [1, 2, 78])
    assert chains.guesses.tokens[0][0] == 50


def test_guesses_are_read_from_the_device_once_and_only_when_asked_for(models, monkeypatch):
    """``read`` queues the guesses' top-K and leaves the read to the next ``propose`` (on a GPU the host finishes
    the step meanwhile); asking for them reads once, tokens and probabilities together."""
    prompts = new_prompt_tokens(models["llama"], count=2)
    chains = PromptChains(prompts, top_k=3)
    tree = chains.attach(TokenTree([0, 1], [-1, 0]), [1.0, 0.9], 1.9, FLAT, 64)
    logits = torch.randn(len(tree), 320, generator=torch.Generator().manual_seed(0))
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    chains.read(tree, logits, [1, 77])
    assert reads == []
    rows = [i for i in range(len(tree)) if tree.tokens[i] >= prompts.base and root_path(tree, i)[1] == 1]
    top = logits[rows].topk(3, dim=-1)
    assert chains.guesses.tokens == top.indices.tolist() and len(reads) == 2  # one read, then the expectation's
    probs = (top.values - logits[rows].logsumexp(-1, keepdim=True)).exp().tolist()
    assert chains.guesses.probs == probs and len(reads) == 3

def test_a_forward_without_the_prompt_embedding_is_refused(models):
    model = models["llama"]
    drafter = ParallelPromptDecoding(new_prompt_tokens(model), FLAT)
    with pytest.raises(ValueError, match="embed"):
        next(speculative_decode(model, repetitive_prompt(1, 8), 4, SamplingConfig(), set(), drafter,
                                forward=CausalLMForward(model)))


def test_virtual_embedding_keeps_real_ids_bit_identical(models):
    model = models["gpt2"]
    prompts = new_prompt_tokens(model, count=3)
    ids = torch.tensor([[3, 7, prompts.base, 300, prompts.base + 2]])
    embedded = prompts.embedding(model)(ids)
    table = model.get_input_embeddings()
    assert torch.equal(embedded[0, [0, 1, 3]], table(ids[0, [0, 1, 3]]))
    assert torch.equal(embedded[0, 2], prompts.vectors[0]) and torch.equal(embedded[0, 4], prompts.vectors[2])


def test_trained_tokens_are_found_by_model_name_and_checked_against_the_model(models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWORKS_CACHE", str(tmp_path))
    model = models["llama"]
    assert trained_path("someone/Unknown-Model") is None
    prompts = new_prompt_tokens(model, count=3, model_name="someone/Tiny-Llama")
    path = tmp_path / "prompt_tokens" / weights_name("someone/Tiny-Llama", "ppd")
    prompts.save(path)
    assert weights_name("someone/Tiny-Llama", "ppd") == "ppd-tiny-llama.safetensors"
    assert trained_path("someone/Tiny-Llama") == path
    loaded = load_prompt_tokens(path, model)
    assert torch.equal(loaded.vectors, prompts.vectors) and loaded.base == prompts.base
    other = tmp_path / "other.safetensors"
    PromptTokens(torch.zeros(3, 48), prompts.base, "someone/Wider").save(other)
    with pytest.raises(ValueError, match="trained for 'someone/Wider'"):
        load_prompt_tokens(other, model)
    with pytest.raises(ValueError, match="trained for"):
        load_prompt_tokens(path, tiny_causal_lm("llama", seed=0, vocab_size=400))
    fresh = tiny_causal_lm("llama", seed=0)
    assert prompt_tokens_for(fresh, "someone/Tiny-Llama").vectors.shape == prompts.vectors.shape
    assert prompt_tokens_for(model, "") is None and prompt_tokens_for(model, "someone/Unknown-Model") is None


def test_distillation_batch_lays_chains_out_as_the_verifier_does():
    prompts = PromptTokens(torch.zeros(2, 8), 320)
    batch = distillation_batch([([5, 6, 7, 8, 9], 2)], prompts, anchors=2, rng=random.Random(0),
                               device=torch.device("cpu"), dtype=torch.float32)
    tokens, positions = batch["tokens"][0].tolist(), batch["positions"][0].tolist()
    allowed = batch["mask"][0, 0] == 0
    assert tokens[:5] == [5, 6, 7, 8, 9] and tokens[5:] == [320, 321, 320, 321]
    anchors = [positions[5] - 1, positions[7] - 1]
    for row, t in zip((5, 7), anchors):
        assert positions[row:row + 2] == [t + 1, t + 2]
        assert allowed[row, :t + 1].all() and not allowed[row, t + 1:5].any() and allowed[row, row]
        assert allowed[row + 1, row] and allowed[row + 1, row + 1] and not allowed[row, row + 1]
    assert not allowed[:5, 5:].any()  # real rows never see a chain: their logits are the teacher
    for student, teacher, depth in zip(batch["students"].tolist(), batch["teachers"].tolist(),
                                       batch["depths"].tolist()):
        assert teacher == positions[student] and 1 <= depth <= 2


def test_training_moves_only_the_prompt_vectors_and_lowers_the_loss():
    model = sharpened_llama()
    rng = random.Random(0)
    # a model-written corpus stand-in: random sequences; the teacher is still the model's own distribution
    data = [([rng.randrange(5, 320) for _ in range(24)], 6) for _ in range(40)]
    config = TrainConfig(model="tiny", device="cpu", count=2, batch=8, anchors=6, epochs=10, lr=5e-2, holdout=0.2)
    with weights_unchanged(model):
        trained, report = train(model, tiny_tokenizer(), config, data=data)
    assert report["loss_last"] < report["loss_first"]
    assert sum(report["holdout_after"]["kl"]) < sum(report["holdout_before"]["kl"])
    assert trained.vectors.shape == (2, model.config.hidden_size)



def test_prompt_chains_through_the_static_path(models):
    """The GPU fast path runs every method through the prompt-aware embedding (captured in its graphs)."""
    from pipelines.decoding.static import StaticForward

    model = models["llama"]
    prompt = repetitive_prompt(2, 30)
    reference = run(plain_decode(model, prompt, 30, SamplingConfig(), set()))
    prompts, drafters = ppd_drafters(model)
    forward = StaticForward(model, max_cache_len=512, buckets=(1, 8, 32, 128), capture=False,
                            embed=prompts.embedding(model))
    assert run(plain_decode(model, prompt, 30, SamplingConfig(), set(), forward=forward)) == reference
    for name, drafter in drafters.items():
        assert run(speculative_decode(model, prompt, 30, SamplingConfig(), set(), drafter,
                                      forward=forward)) == reference, name


def test_the_likeliest_guesses_get_recycled_successors_grafted_below(models):
    model = models["llama"]
    prompts = new_prompt_tokens(model)
    matrix = torch.zeros(320, 8, dtype=torch.long)
    matrix[42] = torch.arange(100, 108)
    matrix[43] = torch.arange(200, 208)
    drafter = new_merged(TokenRecycling(matrix), NGramTrie(1000), FLAT, prompts)
    drafter.graft = 1
    drafter.chains.guesses = Guesses([[42, 43], [44]], [[0.6, 0.3], [0.5]])
    tree = drafter.propose([5, 6, 7])
    paths = {tuple(root_path(tree, i)) for i in range(len(tree)) if tree.tokens[i] < prompts.base}
    assert {(7, 42), (7, 43), (7, 42, 44), (7, 43, 44), (7, 42, 100)} <= paths
    assert not any(path[:3] == (7, 43, 200) for path in paths)  # only the first guess is grafted
