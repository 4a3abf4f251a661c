"""Drafting and verification on the device give what the host code gave: the same accepted path, the same trees,
and trees that never spill into the next bucket of the static path."""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.decoding.device_accept import greedy_accept
from pipelines.decoding.hardware import bucketed, pick_tree_size
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts, lm_head_logits, new_head
from pipelines.decoding.drafters.recycling import TokenRecycling
from pipelines.decoding.static import StaticForward
from pipelines.decoding.tree import TokenTree
from pipelines.decoding.verify import accept, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import repetitive_prompt, run
from test_decoding import RandomTreeDrafter


def random_tree(rng: random.Random, size: int, vocab: int) -> TokenTree:
    """Few distinct tokens, so siblings often repeat a token and paths often match the argmax."""
    tokens, parents = [rng.randrange(vocab)], [-1]
    for i in range(1, size):
        parents.append(rng.randrange(i) if rng.random() < 0.5 else i - 1)
        tokens.append(rng.randrange(vocab))
    return TokenTree(tokens, parents)


def peaked_logits(rng: random.Random, tree: TokenTree, vocab: int) -> torch.Tensor:
    """Logits whose argmax is often one of the node's children's tokens (deep accepted paths)."""
    logits = torch.randn(len(tree), vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
    children = tree.children()
    for node in range(len(tree)):
        if children[node] and rng.random() < 0.8:
            logits[node, rng.choice(list(children[node]))] += 10.0
    return logits


@pytest.mark.parametrize("seed", range(6))
def test_one_read_acceptance_equals_the_host_walk(seed):
    rng = random.Random(seed)
    greedy = SamplingConfig()
    deep = 0
    for _ in range(40):
        tree = random_tree(rng, rng.randrange(1, 40), vocab=4)
        logits = peaked_logits(rng, tree, vocab=4)
        expected = accept(tree, logits, greedy, None)
        assert greedy_accept(tree, logits) == expected
        deep += len(expected[0]) >= 3
    assert deep >= 5  # the check covered deep accepted paths, not only rejections at the root



def test_greedy_acceptance_launches_one_op_whatever_the_tree():
    """A GPU launches a kernel per tensor op: acceptance is one argmax over the verified rows (then one read), not
    a device walk of ~45 ops a step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    rng = random.Random(7)
    for size in (2, 40, 128):
        tree = random_tree(rng, size, vocab=4)
        logits = peaked_logits(rng, tree, vocab=4)
        with Ops() as ops:
            greedy_accept(tree, logits)
        assert ops.names == ["argmax"], size

class RowSpy(StaticForward):
    """Records how many rows each forward verified."""

    rows: list[int]

    def __call__(self, ids, position_ids, mask, cache, keep=None):
        self.rows.append(len(ids))
        return super().__call__(ids, position_ids, mask, cache, keep)


def test_re_fed_rows_never_spill_a_tree_into_the_next_bucket():
    model = tiny_causal_lm("llama", seed=0)
    prompt = repetitive_prompt(5, 19)
    reference = run(plain_decode(model, prompt, 40, SamplingConfig(), set()))
    forward = RowSpy(model, max_cache_len=256, buckets=(1, 8, 16, 32), capture=False)
    forward.rows = []
    out = run(speculative_decode(model, prompt, 40, SamplingConfig(), set(), RandomTreeDrafter(3, 8), forward=forward))
    assert out == reference
    assert max(forward.rows[1:]) == 8  # the 8-node trees, some behind re-fed rows, all fit bucket 8
    tree = TokenTree(list(range(16)), [-1] + list(range(15)))
    assert len(forward.fit(tree, 0)) == 16 and len(forward.fit(tree, 3)) == 13
    assert len(forward.fit(tree, 20)) == 12  # 20 re-fed rows need bucket 32 anyway: the tree fills it


def test_bucketed_curve_prices_a_size_at_its_bucket():
    curve = bucketed({1: 1.0, 8: 1.1, 16: 1.5}, (1, 8, 16))
    assert sorted(curve) == list(range(1, 17)) and curve[2] == curve[8] == 1.1 and curve[9] == 1.5
    # nodes 2..7 and a re-fed row cost nothing more and fill bucket 8; the next ones are not worth bucket 16
    rates = [1.0] + [0.12] * 7 + [0.1] + [0.0] * 7
    assert pick_tree_size(rates, curve) == 7
    assert pick_tree_size(rates, {1: 1.0, 8: 1.1, 16: 1.5}) == 9  # interpolated: spills


def test_step_costs_measure_the_serving_forward_at_its_buckets(monkeypatch):
    from pipelines.decoding import hardware

    model = tiny_causal_lm("llama", seed=1)
    forward = StaticForward(model, max_cache_len=512, buckets=(1, 8, 16), capture=False)
    seen = {}

    def measure(m, sizes, forward=None, **options):
        seen.update(sizes=sizes, forward=forward)
        return {1: 1.0, 8: 2.0, 16: 3.0}

    monkeypatch.setattr(hardware, "measure_step_cost", measure)
    curve = hardware.step_costs(model, "auto", forward)
    assert seen == {"sizes": (1, 8, 16), "forward": forward} and curve[9] == 3.0 and len(curve) == 16
    monkeypatch.undo()
    real = hardware.measure_step_cost(model, (1, 8), context=8, repeats=1, forward=forward)
    assert sorted(real) == [1, 8] and forward.cache.get_seq_length() == 8  # measured rows rolled back


def host_candidates(drafts: HeadDrafts, root: int, max_nodes: int):
    """The head's tree as the host loop grew it before the levels moved to the device (one read per level)."""
    hidden = drafts.anchor
    tokens, parents, ranks, conditional, path = [root], [-1], [0], [1.0], [1.0]
    before, level = {0: hidden}, [0]
    ids = drafts.id_map.tolist() if drafts.id_map is not None else None
    for width, rows in drafts.plan(max_nodes):
        chosen = sorted(level, key=lambda i: -path[i])[:width]
        if not chosen or len(tokens) >= max_nodes:
            break
        states = drafts.head.advance(torch.stack([before[i] for i in chosen]),
                                     drafts.embedding(torch.tensor([tokens[i] for i in chosen])))
        logits = lm_head_logits(drafts.model, drafts.head.readout(states, hidden.expand(len(chosen), -1)),
                                drafts.lm_weight[:rows]).float()
        top = logits.topk(drafts.top_k, dim=-1)
        probs = (top.values - logits.logsumexp(-1, keepdim=True)).exp().tolist()
        level = []
        for j, node in enumerate(chosen):
            for rank, (index, p) in enumerate(zip(top.indices[j].tolist(), probs[j])):
                level.append(len(tokens))
                before[len(tokens)] = states[j]
                tokens.append(ids[index] if ids is not None else index)
                parents.append(node)
                ranks.append(rank)
                conditional.append(p)
                path.append(path[node] * p)
    kept = sorted(range(len(tokens)), key=lambda i: (-path[i], i))[:max_nodes]
    index = {old: new for new, old in enumerate(kept)}
    tree = TokenTree([tokens[i] for i in kept], [index[parents[i]] if i else -1 for i in kept])
    return tree, [ranks[i] for i in kept], [conditional[i] for i in kept], [path[i] for i in kept]


@pytest.mark.parametrize("trained_like", [False, True])
def test_head_levels_on_the_device_grow_the_host_loops_tree(trained_like):
    """Fixed-shape levels (capturable) give the very tree, ranks and probabilities of the host loop, also with an
    untrained head whose equal rows tie everywhere (ties go to the earlier node in both)."""
    model = tiny_causal_lm("qwen2", seed=0).eval()
    torch.manual_seed(4)
    head = new_head(model, vocab=torch.randperm(320)[:200] if trained_like else None)
    if trained_like:
        torch.nn.init.normal_(head.out.weight, std=0.05)
    drafts = HeadDrafts(head.eval(), model, vocab=96, narrow_vocab=48)
    drafts.anchor = torch.randn(model.config.hidden_size)
    with torch.inference_mode():
        for max_nodes in (5, 8, 16, 64, 81, 128):
            got, expected = drafts.candidates(11, max_nodes), host_candidates(drafts, 11, max_nodes)
            assert (got[0].tokens, got[0].parents) == (expected[0].tokens, expected[0].parents), max_nodes
            assert got[1:] == expected[1:], max_nodes


def test_recycling_fills_the_template_from_the_matrix_as_the_host_rule_says():
    """Node i holds ``matrix[token of its parent, its rank]`` and that entry's recorded probability, for every
    template size (each size's gathers are one graph on a GPU)."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 50, (50, 8), generator=generator)
    probs = torch.rand(50, 8, generator=generator)
    drafter = TokenRecycling(matrix, probs=probs)
    for nodes in (81, 1, 12, 40, 12):
        drafter.resize(nodes)
        tree, recorded = drafter.scored([3, 17])
        template = drafter.active
        assert tree.tokens[0] == 17 and tree.parents == list(template.parents) and recorded[0] == 1.0
        for i in range(1, len(tree)):
            parent_token, rank = tree.tokens[template.parents[i]], template.ranks[i]
            assert tree.tokens[i] == int(matrix[parent_token, rank])
            assert recorded[i] == float(probs[parent_token, rank])
