"""Shared by the decoding tests: tiny model families, cost curves, prompts with repeats to draft from."""
from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from pipelines.decoding.drafters.recurrent_drafter import DraftHead, new_head
from pipelines.decoding.plain import DecodeStats, SamplingConfig, plain_decode
from pipelines.decoding.sliding import additive
from pipelines.decoding.tree import TokenTree, block_position_ids, block_visibility
from pipelines.decoding.verify import speculative_decode
from pipelines.tiny import tiny_causal_lm

FAMILIES = ("llama", "qwen2", "gpt2")
FLAT = {1: 1.0, 128: 1.0}  # a GPU-like cost curve: every candidate is worth verifying
STEEP = {1: 1.0, 2: 1.1, 3: 1.2, 4: 2.0, 128: 128.0}  # a CPU-like one with a jump at 4 rows


def repetitive_prompt(seed: int, length: int) -> torch.Tensor:
    rng = random.Random(seed)
    motif = [rng.randrange(5, 320) for _ in range(rng.randrange(3, 8))]
    ids = (motif * (length // len(motif) + 1))[:length]
    for i in rng.sample(range(length), length // 5):
        ids[i] = rng.randrange(5, 320)
    return torch.tensor([ids])


def run(generator) -> list[int]:
    return [token for chunk in generator for token in chunk]


def stop_inside_reference(reference: list[int], after: int = 8) -> tuple[int, list[int]]:
    """A stop token the reference first writes at position ``after`` or later, and the reference cut just after
    it: an EOS that a deep drafted path meets mid-tree, not one greedy would stop on earlier."""
    eos = next(t for i, t in enumerate(reference) if i >= after and t not in reference[:i])
    return eos, reference[:reference.index(eos) + 1]


def assert_identical_to_greedy(model, prompt: torch.Tensor, make_drafters, new_tokens: int = 30,
                               forward=None) -> dict:
    """Every drafter ``make_drafters()`` builds (name -> drafter) decodes plain greedy's ids, all
    ``new_tokens`` of them (every one counted as accepted by some forward), and stops where greedy does when an
    EOS comes mid-run (fresh drafters); through ``forward`` when given. Returns the first set, for checks of
    what they drafted."""
    reference = run(plain_decode(model, prompt, new_tokens, SamplingConfig(), set()))
    drafters = make_drafters()
    for name, drafter in drafters.items():
        stats = DecodeStats()
        out = run(speculative_decode(model, prompt, new_tokens, SamplingConfig(), set(), drafter, stats=stats,
                                     forward=forward))
        assert out == reference, name
        assert stats.new_tokens == new_tokens and sum(stats.accepted_per_forward) == new_tokens, name
    eos = reference[len(reference) // 2]
    for name, drafter in make_drafters().items():
        out = run(speculative_decode(model, prompt, new_tokens, SamplingConfig(), {eos}, drafter, forward=forward))
        assert out == reference[:reference.index(eos) + 1], name
    return drafters


def assert_sampling_reproduced(model, drafters: dict) -> None:
    """Seeded sampling through each drafter (name -> drafter) draws plain sampling's tokens: one draw per
    committed token from the same processed logits and generator."""
    prompt = repetitive_prompt(6, 15)
    config = SamplingConfig(temperature=0.8, top_p=0.9, seed=11)
    reference = run(plain_decode(model, prompt, 30, config, set()))
    for name, drafter in drafters.items():
        assert run(speculative_decode(model, prompt, 30, config, set(), drafter)) == reference, name


@torch.inference_mode()
def tree_logits(forward, context: list[int], tree: TokenTree) -> torch.Tensor:
    """Logits of every node of ``tree`` (root = ``context[-1]``) after ``context[:-1]`` is cached."""
    cache = forward.new_cache()
    forward(context[:-1], torch.arange(len(context) - 1)[None], None, cache)
    past = cache.get_seq_length()
    visible = torch.from_numpy(block_visibility(tree, 0, past)).to(forward.device)
    return forward(tree.tokens, block_position_ids(tree, 0, past, forward.device), additive(visible, torch.float32),
                   cache)


def root_path(tree: TokenTree, node: int) -> list[int]:
    """Tokens from the root down to ``node``."""
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


def packaged_causal_lm(locate, package: str):
    """Tokenizer and model of real weights shipped in a package (``pipelines.packaged``); skips when the
    package is not installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = locate()
    if location is None:
        pytest.skip(f"{package} is not installed")
    model = AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa").eval()
    return AutoTokenizer.from_pretrained(location), model


def random_head(model, seed: int = 1, vocab: torch.Tensor | None = None) -> DraftHead:
    """An untrained ReDrafter head whose readout is not the identity (the zero-initialised output layer is
    randomised), so its drafts differ from the model's own next token: the mechanics without the skill."""
    torch.manual_seed(seed)
    head = new_head(model, vocab=vocab)
    torch.nn.init.normal_(head.out.weight, std=0.05)
    return head.eval()


def sharpened_llama() -> torch.nn.Module:
    """A tiny llama for the drafter trainings: random weights predict almost uniformly, so its LM head is scaled
    up 8x to give the drafter a distribution worth learning."""
    model = tiny_causal_lm("llama", seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


@contextmanager
def weights_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Fails unless every tensor of ``model``'s state is bit-identical after the block: a drafter's training
    must leave the model it learns from frozen."""
    before = {name: p.clone() for name, p in model.state_dict().items()}
    yield
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, before[name]), name


def tree_digest(tree: TokenTree) -> str:
    """A short fingerprint of a tree's tokens and shape, for recorded-tree tests."""
    return hashlib.sha1(json.dumps([tree.tokens, tree.parents]).encode()).hexdigest()[:12]


def assert_recorded(got: dict, expected: dict) -> None:
    """A run proposes the recorded trees (naming the first step that differs) and matches the rest of its record."""
    assert len(got["trees"]) == len(expected["trees"])
    first = next((i for i, (a, b) in enumerate(zip(got["trees"], expected["trees"])) if a != b), None)
    assert first is None, f"step {first} proposes another tree"
    assert got == expected
