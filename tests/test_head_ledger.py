"""The merged drafter uses its draft head only while the head pays for its time: the share of accepted tokens
only the head proposed must exceed the share of the step its calls take; switched off, it is tried again every
HEAD_PROBE-th request. Output stays plain decoding either way."""
from __future__ import annotations

from pipelines.decoding.drafters.lookahead import NGramTrie
from pipelines.decoding.drafters.merged import HEAD_PROBE, HeadLedger, new_merged
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix
from pipelines.decoding.hardware import GPU_STEP_COST
from pipelines.decoding.plain import SamplingConfig
from pipelines.decoding.verify import NoDraft, speculative_decode
from pipelines.tiny import tiny_causal_lm

from decoding_support import random_head, repetitive_prompt, run

VOCAB = 320


def test_the_head_pays_while_its_share_of_tokens_exceeds_its_share_of_time():
    ledger = HeadLedger()
    assert ledger.pays()  # nothing measured: try it
    for _ in range(20):
        ledger.observe(gain=1, tokens=5, cost_s=0.002, step_s=0.006)  # 20 % of the tokens for 33 % of the time
    assert not ledger.pays()
    wanted = []
    for _ in range(2 * HEAD_PROBE):
        wanted.append(ledger.wanted())
        ledger.finished(drafted=wanted[-1])
    assert wanted.count(True) == 2 and wanted[HEAD_PROBE - 1] and wanted[2 * HEAD_PROBE - 1]
    for _ in range(40):
        ledger.observe(gain=3, tokens=6, cost_s=0.001, step_s=0.005)  # 50 % of the tokens for 20 % of the time
    assert ledger.pays() and ledger.wanted()


def test_a_head_that_does_not_pay_stops_drafting_and_output_stays_plain():
    model = tiny_causal_lm("llama", seed=0).eval()
    head = random_head(model)
    ledger = HeadLedger()
    drafter = new_merged(TokenRecycling(cold_matrix(VOCAB)), NGramTrie(1000), GPU_STEP_COST,
                         drafts=HeadDrafts(head, model), ledger=ledger)
    prompt = repetitive_prompt(0, 30)
    plain = run(speculative_decode(model, prompt, 24, SamplingConfig(), set(), NoDraft()))
    assert run(speculative_decode(model, prompt, 24, SamplingConfig(), set(), drafter)) == plain
    assert drafter.head_on and ledger.tokens > 0 and ledger.step_s > ledger.cost_s > 0  # measured while on
    ledger.observe(gain=0, tokens=1000, cost_s=1.0, step_s=1.0)  # as if it never helped and cost every step
    assert not drafter.reads_hidden
    assert run(speculative_decode(model, prompt, 24, SamplingConfig(), set(), drafter)) == plain
    assert drafter.trained_used()["draft_head"] is False and ledger.off == 1
