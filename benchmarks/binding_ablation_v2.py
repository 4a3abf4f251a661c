"""Which part of ToMe semantic binding costs micro-world v2 its objects: control_effect_v2's binding units rendered
through the served path (``ImagePipeline.generate``) with ``BindingConfig`` variants, each scored by the v2 scorer
against the same controls-off baseline. The served defaults are untouched: a variant replaces the config the
request's ``ControlPlan`` builds, for this process only.

The first variant renders the A/B pair (baseline and binding); the others render binding only, paired with that
baseline (same prompt, seed and request, so the same initial noise). ``--variants ets0`` alone costs two renders a
unit instead of three, where the served variant's figures are already on record.

    # CPU, 16 units (2 prompts x 8 seeds), every variant (~12 min on 2 cores)
    python benchmarks/binding_ablation_v2.py --units 16 --device cpu --json /tmp/binding_ablation.json \
        --sheet /tmp/binding_ablation.png --images /tmp/binding_ablation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import control_effect_v2 as effect  # noqa: E402
from benchmarks.report import benchmark_report, write_report  # noqa: E402
from pipelines.diffusion import controls  # noqa: E402
from pipelines.diffusion.binding import BindingConfig  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import NO_COMPARISON, ImagePipeline  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "served": {},
    "no_token_refinement": {"token_refinement_steps": 0},
    "no_attention_refinement": {"attention_control_steps": 0},
    "composite_only": {"token_refinement_steps": 0, "attention_control_steps": 0},
    "composite_only_uncapped": {"token_refinement_steps": 0, "attention_control_steps": 0,
                                "cap_composite_norm": False},
    "ets0": {"ets_step": 0},  # the official RunConfig1: end tokens from the attribute-free prompt from step 0
}
REQUEST_FIELDS = ("ets_step",)  # set through the request, as the tab does (the plan reads them from it)


@contextmanager
def binding_variant(overrides: dict[str, Any]) -> Iterator[BindingConfig]:
    """Requests with binding on get ``BindingConfig`` with ``overrides`` while inside; the served defaults
    (the dataclass itself) are never edited, and the plan builds the stock config again after."""
    config = replace(BindingConfig(), **overrides)
    with mock.patch.object(controls, "BindingConfig", lambda: config):
        yield config


def render(pipeline: ImagePipeline, jobs: list[effect.Job], args: argparse.Namespace, overrides: dict[str, Any],
           baseline: bool) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(binding paths, baseline paths or [], per-request stats) of ``jobs`` with ``BindingConfig(**overrides)``."""
    on, off, stats = [], [], []
    with binding_variant(overrides):
        for job in jobs:
            compare = "controls off" if baseline else NO_COMPARISON
            fields = {**job.prompt.fields, **{k: v for k, v in overrides.items() if k in REQUEST_FIELDS}}
            paths, base, st = effect.serve(pipeline, effect.base_request(args, job.seed, job.batch, compare=compare,
                                                                         **fields))
            on += paths
            off += base
            stats.append(st)
    return on, off, stats


def scores(paths: list[str], truths: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [effect.unit_metrics(score_file(path, truth), False) for path, truth in zip(paths, truths)]


def variant_row(name: str, overrides: dict[str, Any], off: list[dict[str, float]], on: list[dict[str, float]],
                stats: list[dict[str, Any]], seconds: float, resamples: int) -> dict[str, Any]:
    """The paired comparison against the baseline, the composite tokens' norms (first and last logged) and the
    entropy refinement's evaluations per refined step and request (under the cap where every image stopped)."""
    norms = [list(trace) for st in stats for trace in st.get("binding_token_norm", {}).values()]
    metrics = {m: effect.paired(np.array([u[m] for u in off]), np.array([u[m] for u in on]), effect.BETTER[m],
                                resamples) for m in ("binding", "found", "presence", "leakage", "valid")}
    iterations = [n for st in stats for n in st.get("binding_entropy_iterations", [])]
    return {"method": name, "overrides": overrides, "units": len(on), "metrics": metrics,
            "token_norm_first_last": [[t[0], t[-1]] for t in norms if t],
            "entropy_iterations_per_step": iterations, "seconds": round(seconds, 1)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--batch", type=int, default=effect.MAX_BATCH)
    parser.add_argument("--model", default=effect.MICROWORLD_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--scheduler", default="default")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--images", default="outputs/binding_ablation_v2")
    parser.add_argument("--sheet", help="contact sheet PNG: the baseline row, then one row per variant")
    parser.add_argument("--sheet-units", type=int, default=8)
    parser.add_argument("--json", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names or any(n not in VARIANTS for n in names):
        raise SystemExit(f"--variants: one or more of {', '.join(VARIANTS)} (the first renders the baseline too)")
    pipeline = ImagePipeline(ModelStore(device=torch.device(args.device)), "auto")
    jobs = effect.plan("binding", args.units, args.batch, "")
    truths = [job.prompt.truth for job in jobs for _ in range(job.batch)]
    rows, units, sheet, off = [], [], [], []
    for name in names:
        os.environ["TOKENWORKS_OUTPUT_DIR"] = str((Path(args.images) / name).resolve())
        started = time.perf_counter()
        on_paths, off_paths, stats = render(pipeline, jobs, args, VARIANTS[name], baseline=not off)
        if not off:
            off = list(zip(off_paths, scores(off_paths, truths)))
            sheet.append(("controls off", [Image.open(p) for p, _ in off[:args.sheet_units]]))
        on = scores(on_paths, truths)
        rows.append(variant_row(name, VARIANTS[name], [s for _, s in off], on, stats,
                                time.perf_counter() - started, args.bootstrap))
        units += [{"variant": name, "seed": job.seed + k, "prompt": job.prompt.fields["prompt"],
                   "off": {"path": off[i][0], **off[i][1]},
                   "on": {"path": on_paths[i], **on[i]}}
                  for i, (job, k) in enumerate((j, k) for j in jobs for k in range(j.batch))]
        sheet.append((name, [Image.open(p) for p in on_paths[:args.sheet_units]]))
        print(json.dumps({k: rows[-1][k] for k in ("method", "seconds")}), flush=True)
    if args.sheet:
        effect.contact_sheet(sheet, args.sheet)
    Path(args.images).mkdir(parents=True, exist_ok=True)
    (Path(args.images) / "units.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units))
    settings = {**{k: v for k, v in vars(args).items() if k != "json"},
                "unit": "one (prompt, seed); every variant paired with the first variant's controls-off image"}
    report = benchmark_report("binding_ablation_v2", str(pipeline.store.device), pipeline.spec_for(args.model).name,
                              settings, rows, argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
