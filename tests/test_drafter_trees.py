"""PPD and ReDrafter on their own propose the very trees they proposed before their host-time rewrite (recorded in
``data/drafter_trees.json``): the tiny (sharpened) model with untrained prompt tokens or a random draft head, over flat,
GPU-like, the served H100 bucketed and steep cost curves, through the eager forward and the static (padded) one.
Regenerate the record only from code whose trees are known good: ``python tests/test_drafter_trees.py --record``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipelines.decoding.hardware import GPU_STEP_COST, bucketed
from pipelines.decoding.plain import SamplingConfig
from pipelines.decoding.drafters.prompt_tokens import ParallelPromptDecoding, new_prompt_tokens
from pipelines.decoding.drafters.recurrent_drafter import RecurrentDrafting, new_head
from pipelines.decoding.static import StaticForward
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import CausalLMForward, Drafter, speculative_decode

from decoding_support import FLAT, STEEP, assert_recorded, repetitive_prompt, run, sharpened_llama, tree_digest

RECORD = Path(__file__).parent / "data" / "drafter_trees.json"
# text_served_h100.json's measured curve (ms) at the static path's buckets, as the served drafters see it
H100_BUCKETS = {1: 2.2947, 8: 2.5352, 16: 2.5835, 32: 2.6375, 64: 2.6851, 128: 2.8014, 256: 3.0303}
CURVES = {"flat": FLAT, "gpu": GPU_STEP_COST, "h100": bucketed(H100_BUCKETS, tuple(H100_BUCKETS)), "steep": STEEP}
PROMPTS = ((0, 23), (1, 61), (2, 40))


def recording(drafter: Drafter, digests: list[str], sizes: list[int]) -> Drafter:
    """``drafter`` with every proposed tree's digest and size appended to ``digests`` and ``sizes``."""
    propose = drafter.propose

    def recorded(context: list[int]) -> TokenTree:
        tree = propose(context)
        digests.append(tree_digest(tree))
        sizes.append(len(tree))
        return tree

    drafter.propose = recorded
    return drafter


def drafter_run(method: str, curve: str, static: bool) -> dict:
    """Three prompts decoded by one drafter (its state carries over, as served), each tree's digest and the ids."""
    model = sharpened_llama()  # sharp enough for guesses and drafts worth a tree
    embed = None
    if method == "ppd":
        prompts = new_prompt_tokens(model, count=3, seed=1)
        drafter = ParallelPromptDecoding(prompts, CURVES[curve])
        embed = prompts.embedding(model)
    else:
        torch.manual_seed(1)
        head = new_head(model)
        torch.nn.init.normal_(head.out.weight, std=0.05)
        drafter = RecurrentDrafting(head.eval(), model, CURVES[curve])
    forward = (StaticForward(model, max_cache_len=512, buckets=(1, 8, 16, 32, 64, 128), capture=False, embed=embed)
               if static else CausalLMForward(model, embed=embed))
    digests: list[str] = []
    sizes: list[int] = []
    recording(drafter, digests, sizes)
    outputs = [run(speculative_decode(model, repetitive_prompt(seed, length), 40, SamplingConfig(), set(), drafter,
                                      forward=forward)) for seed, length in PROMPTS]
    return {"trees": digests, "sizes": sizes, "outputs": outputs}


RUNS = {f"{method}_{curve}{'_static' if static else ''}": (lambda m=method, c=curve, s=static: drafter_run(m, c, s))
        for method in ("ppd", "redrafter") for curve in CURVES for static in (False, True)
        if not static or curve in ("gpu", "h100")}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_drafter_proposes_the_recorded_trees(name):
    expected = json.loads(RECORD.read_text())[name]
    got = RUNS[name]()
    assert_recorded(got, expected)


def test_recorded_runs_draft_real_trees():
    """The record exercises trees, not bare roots (a run of one-node trees would prove nothing): where rows are
    cheap, most steps verify a tree, and the PPD trees carry prompt-token chains (more nodes than real ones)."""
    record = json.loads(RECORD.read_text())
    for name, entry in record.items():
        if "steep" not in name:
            assert sum(size > 1 for size in entry["sizes"]) > len(entry["sizes"]) // 2, name
            assert max(entry["sizes"]) >= 8, name


if __name__ == "__main__" and "--record" in sys.argv:
    RECORD.write_text(json.dumps({name: make() for name, make in sorted(RUNS.items())}, indent=1) + "\n")
