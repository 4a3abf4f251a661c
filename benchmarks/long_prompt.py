"""Long prompts (issue 20): what an 8000-token prompt costs the drafters and the whole request.

    python benchmarks/long_prompt.py --model tiny --prompt-tokens 8000 --max-new-tokens 64 --threads 1 \
        --json benchmarks/results/long_prompt_cpu_tiny.json

Rows: (1) the Lookahead trie's ``start`` on the prompt after a 2000-token answer, and whether that answer's
n-grams survive; (2) per drafter, ``start`` and mean ``propose`` / ``update`` seconds at a short and at the long
context (cost that grows with the context shows as a ratio well above 1); (3) the whole request, plain decoding
(prefill + decode) vs merged, interleaved, median of repeats, plus merged with a 4-D mask over the prompt block
(what the verifier did before long blocks went in as a chain).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.decoding import verify  # noqa: E402
from pipelines.decoding.drafters.lookahead import LookaheadConfig, LookaheadTrie, NGramTrie  # noqa: E402
from pipelines.decoding.drafters.merged import new_merged  # noqa: E402
from pipelines.decoding.drafters.prompt_lookup import PromptLookup  # noqa: E402
from pipelines.decoding.drafters.recycling import TokenRecycling, cold_matrix  # noqa: E402
from pipelines.decoding.hardware import step_costs  # noqa: E402
from pipelines.decoding.plain import SamplingConfig, plain_decode  # noqa: E402
from pipelines.packaged import PACKAGED_RESOLVERS  # noqa: E402
from pipelines.tiny import tiny_causal_lm  # noqa: E402


def document(length: int, vocab: int, seed: int) -> list[int]:
    """A pasted document: sentences drawn from a small pool (so n-grams repeat, as in real text), in random order."""
    rng = random.Random(seed)
    pool = [[rng.randrange(5, vocab) for _ in range(rng.randrange(8, 24))] for _ in range(200)]
    ids: list[int] = []
    while len(ids) < length:
        ids.extend(rng.choice(pool))
    return ids[:length]


def trie_start_row(prompt: list[int], vocab: int, repeats: int) -> dict:
    times, cpu, survived = [], [], True
    for repeat in range(repeats):
        rng = random.Random(repeat)
        drafter = LookaheadTrie(LookaheadConfig(), NGramTrie(LookaheadConfig.max_nodes))
        answer = [rng.randrange(5, vocab) for _ in range(2000)]
        drafter.start(answer[:3])
        drafter.update(None, torch.empty(0), answer)
        drafter.finish()
        started, used = time.perf_counter(), time.process_time()
        drafter.start(prompt)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
        survived &= drafter.propose(answer[:101]).tokens[1:5] == answer[101:105]
        drafter.finish()
    return {"method": "lookahead_trie_start", "prompt_tokens": len(prompt), "start_s": statistics.median(times),
            "start_cpu_s": statistics.median(cpu), "earlier_answer_kept": survived}


def drafter_costs(make, prompt: list[int], vocab: int, steps: int = 20) -> dict:
    """``start`` and mean ``propose``/``update`` seconds with ``prompt`` as the context (random logits)."""
    drafter = make()
    started = time.perf_counter()
    drafter.start(prompt)
    start_s = time.perf_counter() - started
    context, propose_s, update_s = list(prompt), 0.0, 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        began = time.perf_counter()
        tree = drafter.propose(context)
        proposed = time.perf_counter()
        accepted = [int(torch.randint(5, vocab, (1,), generator=generator))]
        drafter.update(tree, torch.randn(len(tree), vocab, generator=generator), accepted)
        update_s += time.perf_counter() - proposed
        propose_s += proposed - began
        context.extend(accepted)
    drafter.finish()
    return {"start_s": start_s, "propose_s": propose_s / steps, "update_s": update_s / steps}


def growth_rows(prompt: list[int], vocab: int, costs: dict[int, float]) -> list[dict]:
    makers = {
        "prompt_lookup": PromptLookup,
        "lookahead": lambda: LookaheadTrie(LookaheadConfig(), NGramTrie(LookaheadConfig.max_nodes)),
        "recycling": lambda: TokenRecycling(cold_matrix(vocab)),
        "merged": lambda: new_merged(TokenRecycling(cold_matrix(vocab)), NGramTrie(LookaheadConfig.max_nodes), costs),
    }
    rows = []
    for name, make in makers.items():
        short = drafter_costs(make, prompt[-500:], vocab)
        long = drafter_costs(make, prompt, vocab)
        rows.append({"method": f"{name}_drafter_costs", "short_context": 500, "long_context": len(prompt),
                     **{f"{key}_short": value for key, value in short.items()},
                     **{f"{key}_long": value for key, value in long.items()},
                     "propose_growth": long["propose_s"] / short["propose_s"],
                     "update_growth": long["update_s"] / short["update_s"]})
    return rows


def request_rows(model, prompt: list[int], max_new: int, repeats: int, costs: dict[int, float]) -> list[dict]:
    """Plain vs merged on the whole request, interleaved; merged's trie and matrix fresh per request."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([prompt], device=model.device)
    long_block = verify.LONG_BLOCK

    def merged(masked_prompt: bool):
        verify.LONG_BLOCK = 1 << 30 if masked_prompt else long_block
        try:
            drafter = new_merged(TokenRecycling(cold_matrix(vocab)), NGramTrie(LookaheadConfig.max_nodes), costs)
            return [t for run in verify.speculative_decode(model, ids, max_new, SamplingConfig(), set(), drafter)
                    for t in run]
        finally:
            verify.LONG_BLOCK = long_block

    runs = {"plain": lambda: [t for run in plain_decode(model, ids, max_new, SamplingConfig(), set()) for t in run],
            "merged": lambda: merged(False), "merged_mask_over_prompt": lambda: merged(True)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[int]] = {}
    for repeat in range(repeats + 1):  # the first round warms up
        order = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]
        for name in order:
            started, used = time.perf_counter(), time.process_time()
            outputs[name] = runs[name]()
            if repeat:
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - used)
    base, base_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    # on a shared CPU the process time (one thread: the work done) is the steadier figure; both are kept
    return [{"method": name, "prompt_tokens": len(prompt), "new_tokens": max_new,
             "wall_s": statistics.median(times[name]), "ratio_to_plain": statistics.median(times[name]) / base,
             "cpu_s": statistics.median(cpu[name]), "cpu_ratio_to_plain": statistics.median(cpu[name]) / base_cpu,
             "identical_to_plain": outputs[name] == outputs["plain"], "repeats": repeats} for name in runs]


def load(name: str):
    if name == "tiny":
        return tiny_causal_lm("llama", seed=0)
    from transformers import AutoModelForCausalLM

    location = PACKAGED_RESOLVERS[name]()
    if location is None:
        raise SystemExit(f"The packaged model {name!r} is not installed.")
    return AutoModelForCausalLM.from_pretrained(location, attn_implementation="sdpa").eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a packaged alias (smollm2-135m, gemma3-270m)")
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = document(args.prompt_tokens, vocab, seed=0)
    costs = step_costs(model, "auto")
    rows = [trie_start_row(prompt, vocab, args.repeats), *growth_rows(prompt, vocab, costs),
            *request_rows(model, prompt, args.max_new_tokens, args.repeats, costs)]
    report = {"benchmark": "long_prompt", "device": "cpu", "model": args.model,
              "settings": {**vars(args), "threads": torch.get_num_threads()}, "command": command_line(argv),
              "rows": rows}
    write_report(report, args.json)
    for row in rows:
        print(row)
    return report


if __name__ == "__main__":
    main()
