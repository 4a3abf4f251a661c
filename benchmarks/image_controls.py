"""Overhead of the image controls (ToMe binding, LPA, leakage fix) as a time ratio vs the plain pipeline.

Each method runs the same prompt and seed as the baseline, interleaved, after a warm-up; the ratio is the
median of per-repeat ratios. Random weights are fine for cost (the work does not depend on the weights).

    python benchmarks/image_controls.py --arch sd15 --model tiny --steps 10 --repeats 3 --json OUT
    python benchmarks/image_controls.py --arch sdxl --model hub --device cuda --steps 50 --json OUT
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

PROMPT = "a [red hat] and a [blue car] in watercolor style"
METHODS = {
    "baseline": {},
    "binding": {"binding": True},
    "lpa": {"lpa": True},
    "leakfix": {"isolate": "car"},
    "binding+lpa": {"binding": True, "lpa": True},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--model", choices=["tiny", "hub"], default="tiny",
                        help="tiny: random tiny UNet built in-process; hub: the preset's real model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=0, help="0 = the model's native size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", tempfile.mkdtemp(prefix="image-controls-"))

    device = torch.device(args.device)
    pipeline = ImagePipeline(ModelStore(device=device), "tiny" if args.model == "tiny" else "auto")
    name = next(s.name for s in pipeline.specs if s.kind == args.arch)

    def run(options: dict) -> float:
        request = ImageRequest(prompt=PROMPT, model=name, steps=args.steps, seed=0, width=args.size,
                               height=args.size, preview_every=0, **options)
        sync(device)
        start = time.perf_counter()
        pipeline.run(request)
        sync(device)
        return time.perf_counter() - start

    for options in METHODS.values():  # warm-up: loading, kernels, allocator
        run(options)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method, options in METHODS.items():
            times[method].append(run(options))
    rows = []
    for method in METHODS:
        ratios = [t / b for t, b in zip(times[method], times["baseline"])]
        rows.append({"method": method, "median_s": round(statistics.median(times[method]), 4),
                     "time_ratio_vs_baseline": round(statistics.median(ratios), 3), "times_s": [round(t, 4) for t in times[method]]})
    result = {"benchmark": "image_controls", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "model": name,
              "settings": {"arch": args.arch, "steps": args.steps, "size": args.size or "native", "repeats": args.repeats,
                           "prompt": PROMPT, "binding_config": "ToMe RunConfig2 defaults scaled to the step count"},
              "command": " ".join(["python", "benchmarks/image_controls.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
