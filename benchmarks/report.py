"""The JSON every benchmark writes (DESIGN.md §5), with the command line that made it."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np


def command_line(argv: list[str] | None) -> str:
    """``python <script> <args>`` as it was run (``argv`` when called from Python, else the process's), quoted
    so it can be pasted into a shell."""
    args = [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
    return "python " + " ".join(shlex.quote(a) for a in args)


def device_name(device: Any) -> str:
    """What a report's "device" says for a ``torch.device``: the GPU's name on CUDA, else "cpu"."""
    if device.type != "cuda":
        return "cpu"
    import torch  # here, not at the top: soak.py writes reports without loading torch

    return torch.cuda.get_device_name(device)


def sync(device: Any) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for elsewhere), so a host clock times it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def benchmark_report(benchmark: str, device: str, model: Any, settings: dict, rows: list[dict],
                     argv: list[str] | None) -> dict:
    """The keys every benchmark's JSON has (DESIGN.md §5), in one place so they stay the same across scripts;
    ``command`` is the command line that made it."""
    return {"benchmark": benchmark, "device": device, "model": model, "settings": settings,
            "command": command_line(argv), "rows": rows}


def write_report(report: dict, path: str | Path | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (folders created); nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of ``values`` (paired differences)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
