"""The tree-size rule prices the host's drafting too: a tree beyond the bare root pays the drafter's measured host
seconds per drafted step, so where no tree's expected tokens pay for it the rule answers a bare root and the drafter
takes plain one-token steps (drafting nothing) for a stretch before it looks again. Output stays plain decoding, token
for token, whether a step drafts or not."""
from __future__ import annotations

import torch

from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import new_merged
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, RecurrentDrafting
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.hardware import (GPU_STEP_COST, LONGEST_STRETCH, PLAIN_STRETCH, DraftingCost, pick_tree_size,
                                         step_prices)
from pipelines.decoding.plain import DecodeStats, SamplingConfig
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import NoDraft, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import FLAT, assert_sampling_reproduced, random_head, repetitive_prompt, run

VOCAB = 320
PATH = [1.0, 0.9, 0.8, 0.5, 0.2]  # a tree worth 3.4 tokens a step at five nodes


def test_the_rule_answers_a_bare_root_where_no_tree_pays_for_its_drafting():
    """Host seconds are paid by every tree beyond the root, never by the bare root (a plain step): the rule is the
    old one at no host cost, and picks 1 exactly when no tree's tokens per second beat one token per plain step."""
    prices = step_prices(GPU_STEP_COST, len(PATH))
    assert pick_tree_size(PATH, GPU_STEP_COST) == pick_tree_size(PATH, GPU_STEP_COST, host_s=0.0) == 5
    plain_rate = 1.0 / prices[1]
    best_tree_rate = max(sum(PATH[:n]) / (prices[n] + 3.0) for n in range(2, len(PATH) + 1))
    assert best_tree_rate < plain_rate and pick_tree_size(PATH, GPU_STEP_COST, host_s=3.0) == 1
    affordable = max(sum(PATH[:n]) / (prices[n] + 0.5) for n in range(2, len(PATH) + 1))
    assert affordable > plain_rate and pick_tree_size(PATH, GPU_STEP_COST, host_s=0.5) > 1
    # a host cost per tree makes small trees no better than large ones: the rule still keeps the best prefix
    assert pick_tree_size(PATH[:2], GPU_STEP_COST, host_s=0.5) == 2


def test_a_plain_stretch_doubles_while_drafting_does_not_pay_and_resets_when_it_does():
    cost = DraftingCost()
    assert cost.seconds == 0.0 and not cost.plain()  # nothing measured: draft
    cost.spent(0.002)
    cost.spent(0.001)
    cost.drafted()
    assert abs(cost.seconds - 0.003) < 1e-12  # propose and update of one step together
    stretches = []
    for _ in range(7):
        assert cost.charge == cost.seconds
        cost.chose(1)  # no tree pays for its drafting
        taken = 0
        while cost.plain():
            taken += 1
        stretches.append(taken)
        assert cost.probing and cost.charge == 0.0  # the probe after a stretch is priced without the host
        cost.chose(5)  # ... and its tree neither ends the doubling nor starts a stretch
        assert not cost.probing and not cost.plain()
    assert stretches == [2, 4, 8, 16, 32, 32, 32] and PLAIN_STRETCH == 2 and LONGEST_STRETCH == 32
    cost.chose(5)
    cost.chose(1)
    assert cost.plain_left == PLAIN_STRETCH
    cost.chose(1)
    cost.start()  # a new request drafts from its first step, and a first stretch is short again
    assert not cost.plain() and not cost.probing
    cost.chose(1)
    assert cost.plain_left == PLAIN_STRETCH
    assert DraftingCost(fixed=0.25).seconds == 0.25


def _merged(model, host: DraftingCost | None, head: bool = False):
    drafts = HeadDrafts(random_head(model), model) if head else None
    return new_merged(TokenRecycling(cold_matrix(VOCAB)), NGramTrie(1000), FLAT, drafts=drafts, host=host)


def _decode(model, drafter, prompt, tokens: int = 40) -> tuple[list[int], DecodeStats]:
    stats = DecodeStats()
    return run(speculative_decode(model, prompt, tokens, SamplingConfig(), set(), drafter, stats=stats)), stats


def _record_trees(drafter) -> list[tuple[bool, int]]:
    """Per step: whether it was a probe, and the size of the tree it proposed."""
    trees, propose = [], drafter.propose

    def recorded(context: list[int]) -> TokenTree:
        probe = drafter.host.probing
        tree = propose(context)
        trees.append((probe, len(tree)))
        return tree

    drafter.propose = recorded
    return trees


def test_drafting_that_never_pays_falls_back_to_plain_steps_with_plain_output():
    """A host price no tree can pay (100 s a step against a 1 s forward: a path is at most 13 tokens): every
    priced step verifies a bare root, drafting stops for ever longer stretches (a probe after each), and the ids
    are plain greedy decoding's (sampled ones too)."""
    model = tiny_causal_lm("llama", seed=0).eval()
    prompt = repetitive_prompt(0, 40)
    plain = run(speculative_decode(model, prompt, 40, SamplingConfig(), set(), NoDraft()))
    for name, make in {"merged": lambda host: _merged(model, host),
                       "merged+head": lambda host: _merged(model, host, head=True),
                       "redrafter": lambda host: RecurrentDrafting(random_head(model), model, FLAT, host=host)}.items():
        free, free_stats = _decode(model, make(DraftingCost(fixed=0.0)), prompt)
        assert free == plain and free_stats.tau > 1.0, name  # drafting for free: trees are verified and accepted
        drafter = make(DraftingCost(fixed=100.0))
        trees = _record_trees(drafter)
        out, stats = _decode(model, drafter, prompt)
        assert out == plain, name
        drafted = [probe for probe, size in trees if size > 1]
        assert drafted and all(drafted), name  # trees only on the probes, which draft as if drafting were free
        if name.startswith("merged"):
            assert drafter.steps <= 10, name  # of 40 steps: priced at 1, 4-5, 10-11, 20-21 and 38-39 only
    assert_sampling_reproduced(model, {"merged": _merged(model, DraftingCost(fixed=100.0)),
                                       "redrafter": RecurrentDrafting(random_head(model), model, FLAT,
                                                                      host=DraftingCost(fixed=100.0))})


def test_the_served_drafters_measure_their_host_time():
    model = tiny_causal_lm("llama", seed=0).eval()
    prompt = repetitive_prompt(1, 30)
    for drafter in (_merged(model, DraftingCost()), RecurrentDrafting(random_head(model), model, FLAT,
                                                                        host=DraftingCost())):
        _decode(model, drafter, prompt, tokens=12)
        assert drafter.host.seconds > 0.0, type(drafter).__name__


def test_update_starts_the_next_steps_device_drafts_and_propose_reads_them():
    """The merged drafter fills the recycler's template (and grows the head's tree) once per step, started in
    ``update`` below the bonus token: a propose that launched its own as well would fill twice."""
    model = tiny_causal_lm("llama", seed=0).eval()
    drafter = _merged(model, None, head=True)
    roots: list[int] = []
    launch = drafter.recycler.launch

    def counted(root: int) -> torch.Tensor:
        roots.append(root)
        return launch(root)

    drafter.recycler.launch = counted
    prompt = repetitive_prompt(2, 30)
    runs = list(speculative_decode(model, prompt, 24, SamplingConfig(), set(), drafter))
    # each step's root is the last committed token; the last update's launch is for a step that never came
    assert roots == [int(prompt[0, -1])] + [chunk[-1] for chunk in runs]
    assert max(map(len, runs)) > 1 and drafter.head_on and drafter._launched is None  # finish drops it


def test_redrafter_scales_its_heads_probabilities_to_what_it_gets_accepted():
    """The head's path probabilities are its own, not measured rates: a served ReDrafter scales them by accepted
    over expected drafted tokens (never up), so an overconfident head sizes its trees, and falls back to plain
    steps, as its acceptance warrants."""
    cost = DraftingCost(fixed=0.0)
    assert cost.calibration == 1.0
    for _ in range(60):
        cost.accepted(predicted=4.0, realized=1)
    assert 0.25 < cost.calibration < 0.27  # 1 of 4 expected tokens, and the prior's one of one
    cost.chose(1)
    for _ in range(40):
        cost.chose(1)
        while cost.plain():
            pass
    assert cost.calibration > 0.9  # a long plain stretch: the evidence fades, the next probe drafts
    cost.accepted(predicted=1.0, realized=100)
    assert cost.calibration == 1.0  # an underconfident head is not scaled up
    model = tiny_causal_lm("llama", seed=0).eval()
    path = [0.8 ** i for i in range(64)]  # a chain, each node 0.8 likely given its parent
    tree = TokenTree(list(range(64)), [-1] + list(range(63)))
    for scale, host_s in ((1.0, 0.0), (0.3, 0.0), (0.3, 0.5), (0.05, 0.5)):
        drafter = RecurrentDrafting(random_head(model), model, GPU_STEP_COST, host=DraftingCost(fixed=host_s))
        drafter.drafts.launch = lambda root, max_nodes: torch.zeros(1)  # stands for a grown tree
        drafter.drafts.read = lambda grown: (tree, [0] * 64, path, path)
        for _ in range(50):
            drafter.host.accepted(predicted=1.0, realized=scale)
        scale = drafter.host.calibration  # near the measured ratio: 50 steps outweigh the prior's one token
        scaled = [1.0] + [p * scale for p in path[1:]] if scale < 1.0 else path
        assert len(drafter.propose([3, 4, 5])) == pick_tree_size(scaled, GPU_STEP_COST, host_s=host_s), scale
    assert pick_tree_size(scaled, GPU_STEP_COST, host_s=0.5) == 1 < pick_tree_size(path, GPU_STEP_COST, host_s=0.5)
