"""Where a drafted method's time goes per step, through the served text path (``TextPipeline.run`` with the tab's
defaults): milliseconds per step in each drafter function and in the verifier's shared step machinery (inclusive: a
caller's figure contains its callees'), so the host's Python can be told from the device work it starts.

    python benchmarks/drafter_host.py --method ppd --fast --curve benchmarks/results/text_served_h100.json \
        --clock thread                          # this CPU, the H100's static path and tree sizes
    python benchmarks/drafter_host.py --method merged --prompts 4 --profile gpu   # this CPU, the GPU's wide trees
    python benchmarks/drafter_host.py --method redrafter --prompts 8 --json /tmp/redrafter_host.json   # on a GPU

On a CPU, ``--clock thread`` counts the process's own CPU time only (other processes on a shared machine do not
inflate it); on a GPU keep ``wall``: a read from the device waits there, and that wait is part of the step.
``--fast`` serves through the static path (``TOKENWORKS_TEXT_FAST=1``: the GPU's host code, run eagerly);
``--curve`` hands the drafters a GPU's measured cost curve (a ``text_served`` report's ``cost_curves_ms``) so they
size their trees as they did there. Device work, not host work, on a GPU: ``StaticForward._step`` (the forward: one
graph replay there), ``HeadDrafts.launch`` and ``TokenRecycling.launch`` (one replay each there);
``TokenRecycling.update`` is mostly the top-k over the verified rows' logits.
The ``gc generation N`` rows are the garbage collector's passes, already counted inside whichever rows allocated
when they ran: on a CPU the eager forward's allocations set off full passes of ~0.2 s that land in a drafter row in
one run and not in the next, so compare the drafter rows of runs whose gc rows match (or subtract them).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, write_report  # noqa: E402
from benchmarks.text_decoding import read_prompts  # noqa: E402
from benchmarks.text_served import use_weights  # noqa: E402
from pipelines.decoding import hardware, methods, plain, state, static, verify  # noqa: E402
from pipelines.decoding.drafters import prompt_tokens, recurrent_drafter  # noqa: E402
from pipelines.decoding.drafters.lookahead import LookaheadTrie  # noqa: E402
from pipelines.decoding.drafters.merged import CandidateTrie, MergedDrafter  # noqa: E402
from pipelines.decoding.drafters.prompt_lookup import PromptLookup  # noqa: E402
from pipelines.decoding.drafters.recycling import TokenRecycling  # noqa: E402
from pipelines.decoding.tree import TokenTree  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.text import TextPipeline, TextRequest  # noqa: E402

PPD, HEAD = prompt_tokens.ParallelPromptDecoding, recurrent_drafter.RecurrentDrafting
# (where the caller looks the function up, its name): module-level functions are wrapped in the module that calls them
TIMED = [(MergedDrafter, "propose"), (MergedDrafter, "_select"), (MergedDrafter, "update"), (MergedDrafter, "_launch"),
         (MergedDrafter, "_observe"), (CandidateTrie, "add"),
         (TokenRecycling, "launch"), (TokenRecycling, "read"), (TokenRecycling, "update"),
         (LookaheadTrie, "scored"), (LookaheadTrie, "update"), (PromptLookup, "matches"), (PromptLookup, "update"),
         (PPD, "propose"), (PPD, "update"), (prompt_tokens.Guesses, "tree"), (prompt_tokens.PromptChains, "sized"),
         (prompt_tokens.PromptChains, "attach"), (prompt_tokens.PromptChains, "read"),
         (HEAD, "propose"), (HEAD, "update"), (recurrent_drafter.HeadDrafts, "launch"),
         (recurrent_drafter.HeadDrafts, "read"), (recurrent_drafter.HeadDrafts, "update"),
         (recurrent_drafter, "pick_tree_size"),
         (TokenTree, "truncated"), (TokenTree, "ancestor_matrix"), (TokenTree, "path_of"), (TokenTree, "children"),
         (TokenTree, "__post_init__"),
         (verify.CausalLMForward, "block_inputs"), (verify.CausalLMForward, "__call__"), (verify, "choose_run"),
         (verify, "greedy_accept"), (plain.DecodeStats, "keep_top"),
         (static.StaticForward, "block_inputs"), (static.StaticForward, "fit"), (static.StaticForward, "__call__"),
         (static.StaticForward, "_stage"), (static.StaticForward, "_step")]
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timing(clock, spent: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap every ``TIMED`` function so that its calls and seconds add up in ``calls`` and ``spent``."""
    for owner, name in TIMED:
        function = getattr(owner, name)
        label = f"{getattr(owner, '__name__', '').rsplit('.', 1)[-1]}.{name}"

        def timed(*args, _function=function, _label=label, **kwargs):
            started = clock()
            try:
                return _function(*args, **kwargs)
            finally:
                spent[_label] += clock() - started
                calls[_label] += 1

        setattr(owner, name, timed)


def gc_timing(clock, spent: dict[str, float], calls: dict[str, int]) -> None:
    """Add up the garbage collector's passes as one more row: a pass runs inside whichever timed function allocated
    past the collector's threshold, so a few full passes (a CPU's eager forward allocates thousands of objects a
    step) can double a drafter row in one run and not the next; this row says how much of the rows they are."""
    started = [0.0]

    def collected(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            label = f"gc generation {info['generation']} (inside the rows)"
            spent[label] += clock() - started[0]
            calls[label] += 1

    gc.callbacks.append(collected)


def counting_rows(rows: list[int]) -> None:
    """Append every verified tree's size to ``rows`` (what the cost curve priced)."""
    choose_run = verify.choose_run

    def counted(tree, *args, **kwargs):
        rows.append(len(tree))
        return choose_run(tree, *args, **kwargs)

    verify.choose_run = counted


def gpu_curve(path: Path) -> tuple[tuple[int, ...], dict[int, float]]:
    """The static path's buckets and its measured cost curve (seconds) from a ``text_served`` report."""
    curves = json.loads(path.read_text())["cost_curves_ms"]
    key = next(k for k in curves if k != "eager")
    return tuple(map(int, key.split(","))), {int(n): ms / 1e3 for n, ms in curves[key].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="merged", help="a text-tab decoding method")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct (packaged)")
    parser.add_argument("--prompts", type=int, default=4, help="the first N prompts of heldout40")
    parser.add_argument("--category", help="only heldout40's prompts of this category (e.g. translation)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", default="auto", help="tree profile: auto (measured curve), cpu or gpu")
    parser.add_argument("--fast", action="store_true", help="the static path on a CPU too (TOKENWORKS_TEXT_FAST=1)")
    parser.add_argument("--curve", type=Path, help="a text_served report whose measured curve sizes the trees")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--weights", help="a model folder or .gguf file holding --model's weights (a device with no "
                        "packaged model: as in text_served.py)")
    parser.add_argument("--host-price", type=float, help="seconds per drafted step the tree-size rule charges for "
                        "drafting, instead of the measured host time (with --curve: this CPU's host time says nothing "
                        "of the GPU's; 0 keeps the trees the curve alone picks)")
    parser.add_argument("--json", type=Path, help="write the rows and the decoded texts here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        os.environ["TOKENWORKS_TEXT_FAST"] = "1"
    if args.host_price is not None:  # the served drafters price their drafting with this instead of measuring it
        state.DraftingCost = methods.DraftingCost = partial(hardware.DraftingCost, fixed=args.host_price)
    rows = [row for row in read_prompts("benchmarks/prompts/heldout40.jsonl")
            if args.category in (None, row.get("category"))]
    prompts = [row["prompt"] for row in rows[:args.prompts]]
    pipeline = TextPipeline(ModelStore())
    if args.weights:
        use_weights(pipeline, args.model, Path(args.weights))
    request = dict(model=args.model, method=args.method, max_new_tokens=args.max_new_tokens,
                   tree_profile=args.profile)
    if args.curve:
        buckets, curve = gpu_curve(args.curve)
        pipeline.load(args.model).state.curves[buckets if args.fast else ()] = hardware.bucketed(curve, buckets)
    pipeline.run(TextRequest(prompt="Hello", **{**request, "max_new_tokens": 8}))  # load, measure, capture
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    timing(CLOCKS[args.clock], spent, calls)
    gc_timing(CLOCKS[args.clock], spent, calls)
    trees: list[int] = []
    counting_rows(trees)
    results = [pipeline.run(TextRequest(prompt=prompt, **request)) for prompt in prompts]
    steps = sum(result.stats["forwards"] for result in results)
    tau = sum(result.stats["tokens"] for result in results) / steps
    rows = [{"function": label, "calls_per_step": round(calls[label] / steps, 2),
             "ms_per_step": round(1e3 * spent[label] / steps, 3)} for label in sorted(spent, key=lambda k: -spent[k])]
    nodes = sum(trees) / max(len(trees), 1)
    plain_steps = sum(size == 1 for size in trees)
    print(f"{args.method}: {steps} steps, tau {tau:.3f}, {nodes:.1f} tree nodes per step, {plain_steps} bare roots, "
          f"clock {args.clock}")
    for row in rows:
        print(f"{row['function']:32s} {row['calls_per_step']:6.2f} calls {row['ms_per_step']:8.3f} ms per step")
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        write_report({"benchmark": "drafter_host", "device": device, "command": command_line(None),
                      "settings": vars(args) | {"json": str(args.json), "curve": str(args.curve or "")},
                      "steps": steps, "tau": tau, "tree_nodes": nodes, "bare_roots": plain_steps, "rows": rows,
                      "texts": [str(result.value) for result in results]},
                     args.json)


if __name__ == "__main__":
    main()
