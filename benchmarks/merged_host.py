"""Where the merged drafter's time goes per step, through the served text path (``TextPipeline.run``, method merged):
milliseconds per step in each drafter function (inclusive: a caller's figure contains its callees'), so the host's
Python can be told from the device work the drafters start.

    python benchmarks/merged_host.py --prompts 4 --profile gpu       # this CPU, the GPU's wide trees
    python benchmarks/merged_host.py --prompts 8 --json /tmp/merged_host.json   # on a GPU (profile auto)

On a CPU, ``--clock thread`` counts the process's own CPU time only (other processes on a shared machine do not
inflate it); on a GPU keep ``wall``: a read from the device waits there, and that wait is part of the step.
``HeadDrafts.launch`` and ``TokenRecycling.launch`` are device work (eager on a CPU, one graph replay each on a
GPU); ``TokenRecycling.update`` is mostly the top-k over the verified rows' logits.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.decoding.drafters.lookahead import LookaheadTrie  # noqa: E402
from pipelines.decoding.drafters.merged import CandidateTrie, MergedDrafter  # noqa: E402
from pipelines.decoding.drafters.prompt_lookup import PromptLookup  # noqa: E402
from pipelines.decoding.drafters.recurrent_drafter import HeadDrafts  # noqa: E402
from pipelines.decoding.drafters.recycling import TokenRecycling  # noqa: E402
from pipelines.decoding.tree import TokenTree  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.text import TextPipeline, TextRequest  # noqa: E402

TIMED = [(MergedDrafter, "propose"), (MergedDrafter, "_select"), (MergedDrafter, "update"), (CandidateTrie, "add"),
         (TokenRecycling, "launch"), (TokenRecycling, "read"), (TokenRecycling, "update"),
         (HeadDrafts, "launch"), (HeadDrafts, "read"), (HeadDrafts, "update"),
         (LookaheadTrie, "scored"), (LookaheadTrie, "update"), (PromptLookup, "matches"), (PromptLookup, "update"),
         (TokenTree, "truncated"), (TokenTree, "ancestor_matrix"), (TokenTree, "path_of")]
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timing(clock, spent: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap every ``TIMED`` function so that its calls and seconds add up in ``calls`` and ``spent``."""
    for owner, name in TIMED:
        function, label = getattr(owner, name), f"{owner.__name__}.{name}"

        def timed(*args, _function=function, _label=label, **kwargs):
            started = clock()
            try:
                return _function(*args, **kwargs)
            finally:
                spent[_label] += clock() - started
                calls[_label] += 1

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct (packaged)")
    parser.add_argument("--prompts", type=int, default=4, help="the first N prompts of heldout40")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", default="auto", help="tree profile: auto (measured curve), cpu or gpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--json", type=Path, help="write the rows and the decoded texts here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = Path("benchmarks/prompts/heldout40.jsonl").read_text().splitlines()[:args.prompts]
    prompts = [json.loads(line)["turns"][0] for line in lines]
    pipeline = TextPipeline(ModelStore())
    request = dict(model=args.model, method="merged", max_new_tokens=args.max_new_tokens, tree_profile=args.profile)
    pipeline.run(TextRequest(prompt="Hello", **{**request, "max_new_tokens": 8}))  # load, measure, capture
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    timing(CLOCKS[args.clock], spent, calls)
    texts = [str(pipeline.run(TextRequest(prompt=prompt, **request)).value) for prompt in prompts]
    steps = calls["MergedDrafter.propose"]
    rows = [{"function": label, "calls_per_step": round(calls[label] / steps, 2),
             "ms_per_step": round(1e3 * spent[label] / steps, 3)} for label in sorted(spent, key=lambda k: -spent[k])]
    print(f"{steps} steps, clock {args.clock}")
    for row in rows:
        print(f"{row['function']:32s} {row['calls_per_step']:6.2f} calls {row['ms_per_step']:8.3f} ms per step")
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        write_report({"benchmark": "merged_host", "device": device, "command": command_line(None),
                      "settings": vars(args) | {"json": str(args.json)}, "steps": steps, "rows": rows,
                      "texts": texts}, args.json)


if __name__ == "__main__":
    main()
