"""The merged drafter proposes the very trees it proposed before its host-time rewrite (recorded in
``data/merged_trees.json``): a scripted verifier (no model, every run deterministic) over flat, GPU-like and steep
cost curves, and the tiny model with a draft head and with prompt tokens. Regenerate the record only from code
whose trees are known good: ``python tests/test_merged_trees.py --record``."""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from pipelines.decoding.hardware import GPU_STEP_COST
from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import MergedDrafter, new_merged
from pipelines.decoding.plain import SamplingConfig
from pipelines.decoding.drafters.prompt_tokens import new_prompt_tokens
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import FLAT, STEEP, assert_recorded, random_head, repetitive_prompt, run, tree_digest

RECORD = Path(__file__).parent / "data" / "merged_trees.json"
VOCAB = 320
CURVES = {"flat": FLAT, "gpu": GPU_STEP_COST, "steep": STEEP}
FOLLOWS = random.Random(VOCAB).choices(range(VOCAB), k=VOCAB)  # the scripted language's bigram table


def recording(drafter: MergedDrafter, digests: list[str]) -> MergedDrafter:
    """``drafter`` with every proposed tree's digest appended to ``digests``."""
    propose = drafter.propose

    def recorded(context: list[int]) -> TokenTree:
        tree = propose(context)
        digests.append(tree_digest(tree))
        return tree

    drafter.propose = recorded
    return drafter


def scripted_stream(seed: int, length: int) -> list[int]:
    """A token stream from a fixed bigram table with random jumps: recycling learns the table, Lookahead and
    prompt lookup find the repeats."""
    rng = random.Random(seed)
    stream = [rng.randrange(VOCAB)]
    while len(stream) < length:
        stream.append(FOLLOWS[stream[-1]] if rng.random() < 0.8 else rng.randrange(VOCAB))
    return stream


def scripted_logits(tree: TokenTree, generator: torch.Generator) -> torch.Tensor:
    """Noise plus a clear favourite per node, the bigram table's successor: recycled rows are informative."""
    logits = torch.randn(len(tree), VOCAB, generator=generator)
    logits[torch.arange(len(tree)), torch.tensor([FOLLOWS[token] for token in tree.tokens])] += 4.0
    return logits


def scripted_run(curve: str) -> dict:
    drafter = new_merged(TokenRecycling(cold_matrix(VOCAB)), NGramTrie(1000), CURVES[curve])
    digests: list[str] = []
    accepted = scripted_decode(recording(drafter, digests))
    return {"trees": digests, "accepted_per_step": accepted, "offered": _rounded(drafter.offered),
            "accepted": _rounded(drafter.accepted)}


def scripted_decode(drafter: MergedDrafter, requests: int = 3, prompt_length: int = 60,
                    new_tokens: int = 80) -> list[int]:
    """Decode ``requests`` scripted requests with one merged drafter (its counts carry over, as served): the
    verifier accepts the path that follows the stream and commits the stream's next token as the bonus. Returns
    the tokens committed per step."""
    per_step = []
    generator = torch.Generator().manual_seed(0)
    for request in range(requests):
        stream = scripted_stream(request, prompt_length + new_tokens + 1)
        context = stream[:prompt_length]
        drafter.start(list(context))
        while len(context) < prompt_length + new_tokens:
            remaining = prompt_length + new_tokens - len(context)
            tree = drafter.propose(context).truncated(max_depth=remaining - 1)
            path = tree.path_of(stream[len(context):])
            committed = [tree.tokens[node] for node in path[1:]] + [stream[len(context) + len(path) - 1]]
            drafter.update(tree, scripted_logits(tree, generator), committed)
            context.extend(committed)
            per_step.append(len(committed))
        drafter.finish()
    return per_step


def _rounded(counts: dict[tuple, float]) -> str:
    """The acceptance counts, order-independent and rounded past float noise."""
    return hashlib.sha1(repr(sorted((repr(k), round(v, 9)) for k, v in counts.items())).encode()).hexdigest()[:12]


def model_run(source: str) -> dict:
    """The tiny model decoding three prompts with a random draft head or untrained prompt tokens merged in."""
    model = tiny_causal_lm("llama", seed=0).eval()
    head = random_head(model)
    drafts = HeadDrafts(head, model) if source == "head" else None
    prompts = new_prompt_tokens(model, count=3, seed=1) if source == "ppd" else None
    drafter = new_merged(TokenRecycling(cold_matrix(VOCAB)), NGramTrie(1000), FLAT, prompts, drafts)
    digests: list[str] = []
    recording(drafter, digests)
    outputs = [run(speculative_decode(model, repetitive_prompt(seed, length), 40, SamplingConfig(), set(), drafter))
               for seed, length in ((0, 23), (1, 61), (2, 40))]
    return {"trees": digests, "outputs": outputs}


RUNS = {**{f"scripted_{curve}": (lambda c=curve: scripted_run(c)) for curve in CURVES},
        "model_head": lambda: model_run("head"), "model_ppd": lambda: model_run("ppd")}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_merged_drafter_proposes_the_recorded_trees(name):
    expected = json.loads(RECORD.read_text())[name]
    got = RUNS[name]()
    assert_recorded(got, expected)


def test_scripted_runs_draft_deep_trees():
    """The record is worth checking only if the runs exercise the merge: many steps accept several tokens."""
    drafter = new_merged(TokenRecycling(cold_matrix(VOCAB)), NGramTrie(1000), GPU_STEP_COST)
    accepted = scripted_decode(drafter)
    assert drafter.nodes / drafter.steps >= 16
    assert sum(accepted) / len(accepted) >= 2.0


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    RECORD.write_text(json.dumps({name: make() for name, make in sorted(RUNS.items())}, indent=0) + "\n")
