"""Diagnostic (not a benchmark of a technique): host CPU time per UNet call of the image tab's served path, by
control configuration, on a tiny model with the fast path's ``eager`` backend (the static code path the GPU
captures, without capture).

Why: at 512 px a replayed SD1.5 step takes ~12 ms on an H100, so Python work per UNet call or per step is exposed
on the GPU. With a tiny model on the CPU the compute is small and the host work dominates. Times are the worker
thread's CPU time (``time.thread_time``, with torch on one thread), so other load on the machine does not count.

Per configuration (medians over requests, microseconds per UNet call of the denoising loop):
``fast_path_us`` = ``FastUNet.forward`` minus the UNet call inside it (what stays on the host when a graph
replays), ``unet_us`` = that UNet call (captured on a GPU), ``loop_other_us`` = the diffusers call minus its UNet
calls (scheduler, step callback, previews, text encoding, VAE decode; per UNet call), ``request_ms`` = the whole
worker-side request. ``fast_path_ops`` / ``unet_ops``: torch ops per UNet call outside / inside the UNet call
(counted in one more request; inside is what a CUDA graph replays as kernels, so a control's GPU cost shows here
without a GPU). ``--profile`` prints the functions with most own time in the worker for each configuration.

    python benchmarks/image_host.py --repeats 5 --json /tmp/image_host.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_served import COMPASS, PROMPT  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.diffusion.fast import FastUNet  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {"plain": {}, "merge": dict(merge_ratio=0.5), "lpa": dict(lpa=True),
                                      "compass": dict(compass=COMPASS), "leakfix": dict(isolate="red hat")}


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched while entered (on this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


class Meter:
    """Thread CPU seconds (or, with ``counter``, torch ops) accumulated by the wrapped methods in one request."""

    def __init__(self, counter: OpCounter | None = None, profile: cProfile.Profile | None = None) -> None:
        self.totals: dict[str, float] = {}
        self.calls = 0
        self.counter, self.profile = counter, profile

    def reading(self) -> float:
        return self.counter.ops if self.counter is not None else time.thread_time()

    def wrap(self, name: str, method: Callable[..., Any], count: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.reading()
            try:
                if count and self.counter is not None:
                    with self.counter:
                        return method(*args, **kwargs)
                return method(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + self.reading() - start
                self.calls += count
        return timed


@contextmanager
def metered(meter: Meter, pipe_class: type) -> Iterator[None]:
    """Wrap the fast path's call, the UNet call inside it, the diffusers call and the worker's render."""
    targets = [(FastUNet, "forward", "fast_path", True), (FastUNet, "_run_hooked", "unet", False),
               (pipe_class, "__call__", "diffusers_call", False), (ImagePipeline, "render", "request", False)]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _, _ in targets]
    for owner, attr, name, count in targets:
        method = owner.__dict__[attr]
        if attr == "render":
            method = profiled(meter, method)
        setattr(owner, attr, meter.wrap(name, method, count))
    try:
        yield
    finally:
        for owner, attr, method in saved:
            setattr(owner, attr, method)


def profiled(meter: Meter, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` under ``meter.profile`` when one is set (cProfile on the worker thread, where it runs)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        if meter.profile is None:
            return method(*args, **kwargs)
        meter.profile.enable()
        try:
            return method(*args, **kwargs)
        finally:
            meter.profile.disable()
    return run


def one_request(served: ImagePipeline, settings: dict[str, Any], args: argparse.Namespace,
                meter: Meter | None = None) -> dict[str, float]:
    meter = meter or Meter()
    pipe_class = type(served.load("").pipe)
    with metered(meter, pipe_class):
        served.run(ImageRequest(prompt=PROMPT, steps=args.steps, width=args.size, height=args.size, seed=1,
                                **settings))
    t, calls = meter.totals, max(meter.calls, 1)
    if meter.counter is not None:
        return {"fast_path_ops": (t["fast_path"] - t["unet"]) / calls, "unet_ops": t["unet"] / calls}
    return {"calls": meter.calls, "fast_path_us": (t["fast_path"] - t["unet"]) / calls * 1e6,
            "unet_us": t["unet"] / calls * 1e6,
            "loop_other_us": (t["diffusers_call"] - t["fast_path"]) / calls * 1e6, "request_ms": t["request"] * 1e3}


def top_functions(profile: cProfile.Profile, count: int) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(count)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (the tiny VAE halves it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the worker's top functions per config")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # thread_time then counts every op the request runs
    served = ImagePipeline(ModelStore(packaged={}), preset="tiny")
    names = args.configs.split(",")
    for name in names:  # warm-up: lazy inits, the fast path's cache entries
        one_request(served, CONFIGS[name], args)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            samples[name].append(one_request(served, CONFIGS[name], args))
    rows = []
    for name in names:
        row = {"config": name, "calls": samples[name][0]["calls"]}
        for field in ("fast_path_us", "unet_us", "loop_other_us", "request_ms"):
            row[field] = round(statistics.median(s[field] for s in samples[name]), 1)
        row.update({k: round(v, 1) for k, v in one_request(served, CONFIGS[name], args, Meter(OpCounter())).items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.profile:
        for name in names:
            profile = cProfile.Profile()
            one_request(served, CONFIGS[name], args, Meter(profile=profile))
            print(f"==== {name}\n{top_functions(profile, 25)}", flush=True)
    report = {"benchmark": "image_host", "device": "cpu", "model": "tiny sd15 (random weights)",
              "settings": {"steps": args.steps, "size": args.size, "repeats": args.repeats, "configs": CONFIGS,
                           "command": command_line(argv)}, "rows": rows}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
