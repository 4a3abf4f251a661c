"""The Lookahead trie on long prompts: a bounded start, and the earlier answers' n-grams survive."""
from __future__ import annotations

import random
import time

import torch

from pipelines.decoding.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie


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
