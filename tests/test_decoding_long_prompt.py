"""Long prompts: the Lookahead trie starts fast and keeps the earlier answers' n-grams (prompt window, per-root
cap), and the prompt goes in under the model's causal mask."""
from __future__ import annotations

import random
import time

import torch

from pipelines.decoding.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie
from pipelines.decoding.plain import SamplingConfig, plain_decode
from pipelines.decoding.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.verify import LONG_BLOCK, CausalLMForward, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import repetitive_prompt, run


def test_earlier_answer_survives_an_8000_token_prompt_and_start_is_fast():
    rng = random.Random(0)
    drafter = LookaheadTrie(LookaheadConfig(), NGramTrie(LookaheadConfig.max_nodes))
    answer = [rng.randrange(1000, 2000) for _ in range(2000)]
    drafter.start([1, 2, 3])
    drafter.update(None, torch.empty(0), answer)
    drafter.finish()
    document = [rng.randrange(2000, 30000) for _ in range(8000)]
    started = time.perf_counter()
    drafter.start(document)
    elapsed = time.perf_counter() - started
    tree = drafter.propose(answer[:101])
    drafter.finish()
    assert elapsed < 1.0, elapsed
    assert tree.tokens[1:5] == answer[101:105]


def test_one_roots_many_continuations_squeeze_only_that_root():
    """alipay's per-root output cap: a token followed by hundreds of different continuations keeps its
    frequent ones and leaves every other root's memory alone."""
    rng = random.Random(1)
    trie = NGramTrie(max_nodes=100_000, max_root_nodes=64)
    frequent = [5, 6, 7, 8]
    other = [9, 10, 11, 12]
    for _ in range(16):
        trie.insert(frequent, from_prompt=False)
    trie.insert(other, from_prompt=False)
    for _ in range(60):  # 180 new nodes under root 5: squeezed a few times
        trie.insert([5] + [rng.randrange(100, 30000) for _ in range(3)], from_prompt=False)
    assert trie.roots[5].size <= 64 and trie.nodes == trie.roots[5].size + trie.roots[9].size
    assert trie.match(frequent) is not None and trie.match(other) is not None
    assert trie.match(other).output == 1  # never halved: the squeeze stayed below root 5


def test_prompt_nodes_do_not_count_against_a_roots_cap():
    trie = NGramTrie(max_nodes=100_000, max_root_nodes=8)
    for i in range(50):
        trie.insert([5, 100 + i, 200 + i], from_prompt=True)
    trie.insert([5, 1, 2], from_prompt=False)
    assert trie.match([5, 1, 2]).output == 1 and trie.roots[5].size == 102
    trie.reset_prompt()
    assert trie.roots[5].size == 2 and trie.nodes == 2


class MaskRecorder(CausalLMForward):
    """Records the size of every 4-D mask the verifier builds."""

    def __call__(self, ids, position_ids, mask, cache, keep=None):
        self.masks = getattr(self, "masks", []) + [None if mask is None else tuple(mask.shape)]
        return super().__call__(ids, position_ids, mask, cache, keep)


def test_a_long_prompt_goes_in_under_the_models_causal_mask():
    """A 4-D mask over the whole prompt is quadratic in it (8000 tokens: merged 2.8x plain on this CPU): the
    first step verifies a chain, later steps full trees."""
    model = tiny_causal_lm("llama", seed=0)
    prompt = repetitive_prompt(2, LONG_BLOCK + 40)
    reference = run(plain_decode(model, prompt, 12, SamplingConfig(), set()))
    forward = MaskRecorder(model)
    drafter = TokenRecycling(cold_matrix(320))
    assert run(speculative_decode(model, prompt, 12, SamplingConfig(), set(), drafter, forward=forward)) == reference
    assert forward.masks[0] is None and all(shape[-1] < prompt.shape[1] + 100 for shape in forward.masks[1:])
    assert all(shape is not None for shape in forward.masks[1:])
