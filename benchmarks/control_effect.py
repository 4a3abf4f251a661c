"""What each image control does to the picture, measured in the v1 micro-world (64 px; superseded by
control_effect_v2.py, which measures v2 on the served path with gates): the same prompts and seeds rendered
with the control off and on through the image pipeline, each image scored by the classical micro-world scorer,
and the paired difference reported with a bootstrap 95 % interval.

Targets: binding accuracy for ToMe binding, style accuracy for LPA, heading error for compass tokens, colour
leakage for the leakage fix (each row also reports the other metrics).

    python benchmarks/control_effect.py --model V1_FOLDER --prompts 50 --seeds 4 \
        --device cuda --json benchmarks/results/control_effect_microworld.json            # trained model
    python benchmarks/control_effect.py --preset tiny --prompts 1 --seeds 1 --steps 2 --json OUT   # harness only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.microworld.scenes import Scene, make_scene  # noqa: E402
from pipelines.microworld.scorer import score_image  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

METRICS = ("binding", "presence", "leakage", "heading_error", "style_correct")
TARGET = {"binding": "binding", "lpa": "style_correct", "compass": "heading_error", "leakfix": "leakage"}
BETTER = {"binding": 1, "presence": 1, "leakage": -1, "heading_error": -1, "style_correct": 1}
PROMPT_SEEDS = 500_000_000  # held out from training (training scenes use seeds below 10_000_000 per run seed)


def benchmark_scenes(count: int, size: int) -> list[Scene]:
    """Two-object scenes with an arrow and two different shapes, captions naming colours, heading and style."""
    scenes, seed = [], PROMPT_SEEDS
    while len(scenes) < count:
        scene = make_scene(seed, size, objects=2, require="arrow", caption_style=True, caption_orientation=True,
                           template=0)
        if len({o.shape for o in scene.objects}) == 2:
            scenes.append(scene)
        seed += 1
    return scenes


def compass_angle(heading: float) -> float:
    """Image-plane heading (0 = right, counter-clockwise) to Compass Control's angle (0 = facing the viewer, 90 =
    facing right, 270 = facing left): right -> 90, left -> 270, up -> 0 (front), down -> 180 (away)."""
    return (90.0 - heading) % 360.0


def control_options(control: str, scene: Scene) -> dict[str, Any]:
    """ImageRequest fields that turn ``control`` on for ``scene``'s caption."""
    if control == "none":
        return {}
    if control == "binding":  # explicit groups: each object's colour bound to its shape
        prompt = scene.caption
        for obj in scene.objects:
            phrase = f"{obj.colour} {obj.shape}"
            prompt = prompt.replace(phrase, f"[{phrase}]", 1)
        return {"prompt": prompt, "binding": True}
    if control == "lpa":
        return {"lpa": True}
    if control == "compass":
        objects = [{"name": o.shape, "angle": compass_angle(o.heading),
                    "box": [round(v / scene.size, 4) for v in (o.box[0], o.box[1], o.box[2] + 1, o.box[3] + 1)]}
                   for o in scene.objects if o.oriented]
        return {"compass": json.dumps(objects)}
    if control == "leakfix":  # each object phrase encoded alone: no colour flows from one object to the other
        return {"isolate": ", ".join(f"{o.colour} {o.shape}" for o in scene.objects)}
    raise SystemExit(f"Unknown control {control!r}; choose from none, {', '.join(TARGET)}.")


def render(pipeline: ImagePipeline, request: ImageRequest) -> tuple[Image.Image, float]:
    for event in pipeline.generate(request):
        if isinstance(event, Result):
            return Image.open(event.value[0]).convert("RGB"), float(event.stats["time_s"])
    raise RuntimeError("the image pipeline ended without a result")


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of ``values`` (paired differences)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(resamples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(off: list[dict[str, Any]], on: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """Per metric: means off and on over the units where both are defined, the paired difference and its CI."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        a = np.array([u[metric] for u in off], np.float64)
        b = np.array([u[metric] for u in on], np.float64)
        keep = np.isfinite(a) & np.isfinite(b)
        diff = b[keep] - a[keep]
        low, high = bootstrap_interval(diff, resamples)
        out[metric] = {"n": int(keep.sum()), "off": mean_or_nan(a[keep]), "on": mean_or_nan(b[keep]),
                       "difference": mean_or_nan(diff), "ci95": [low, high],
                       "excludes_zero": bool(keep.any() and (low > 0 or high < 0)),
                       "improves": bool(keep.any() and (low > 0 if BETTER[metric] > 0 else high < 0))}
    return out


def mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def summary(units: list[dict[str, Any]]) -> dict[str, float]:
    return {m: mean_or_nan(np.array([u[m] for u in units if math.isfinite(u[m])])) for m in METRICS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controls", default="none,binding,lpa,compass,leakfix")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--model", default="",
                        help="a v1 micro-world pipeline folder (v1 weights left the repository with v2; "
                             "control_effect_v2.py measures v2)")
    parser.add_argument("--preset", choices=["auto", "tiny"], default="auto",
                        help="tiny: the random-weight tiny SD1.5 (checks the harness; its numbers mean nothing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64, choices=[64, 128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--compass-encoder", default="phrase")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.preset == "auto" and not args.model:
        parser.error("--model: pass a v1 micro-world folder (64 px scenes), or --preset tiny")
    os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", tempfile.mkdtemp(prefix="control-effect-"))
    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    if "none" not in controls:
        controls.insert(0, "none")

    pipeline = ImagePipeline(ModelStore(device=torch.device(args.device)), args.preset)
    model = "" if args.preset == "tiny" else args.model
    scenes = benchmark_scenes(args.prompts, args.size)
    scores: dict[str, list[dict[str, Any]]] = {c: [] for c in controls}
    times: dict[str, list[float]] = {c: [] for c in controls}
    for scene in scenes:
        for seed in range(args.seeds):
            for control in controls:  # interleaved: every control right after its own baseline
                options = {"prompt": scene.caption, **control_options(control, scene)}
                if control == "compass":
                    options["compass_encoder"] = args.compass_encoder
                request = ImageRequest(model=model, steps=args.steps, cfg=args.cfg, width=args.size,
                                       height=args.size, seed=seed, preview_every=0, **options)
                image, seconds = render(pipeline, request)
                result = score_image(image, scene)
                scores[control].append({m: float(result[m]) for m in METRICS})
                times[control].append(seconds)
    rows: list[dict[str, Any]] = [{"method": "none", "units": len(scores["none"]), **summary(scores["none"]),
                                   "time_s": float(np.median(times["none"]))}]
    for control in controls:
        if control == "none":
            continue
        effect = compare(scores["none"], scores[control], args.bootstrap)
        target = TARGET[control]
        rows.append({"method": control, "units": len(scores[control]), "target_metric": target,
                     "target_effect_excludes_zero": effect[target]["excludes_zero"],
                     "target_improves": effect[target]["improves"], "metrics": effect,
                     "time_ratio_vs_none": float(np.median(np.array(times[control]) / np.array(times["none"])))})
    spec_name = pipeline.spec_for(model).name
    settings = {"controls": controls, "prompts": args.prompts, "seeds": args.seeds, "size": args.size,
                "steps": args.steps, "cfg": args.cfg, "compass_encoder": args.compass_encoder,
                "bootstrap_resamples": args.bootstrap, "prompt_seeds_from": PROMPT_SEEDS,
                "unit": "one (prompt, seed) pair; differences are paired (on - off) per unit",
                "heading_error": "mean over the prompt's arrows the scorer found, degrees; units where either run "
                                 "found none are left out of that metric"}
    if args.preset == "tiny":
        settings["note"] = ("tiny preset: random weights, so the numbers are meaningless; this run only checks that "
                            "the harness works end to end")
    report = {"benchmark": "control_effect", "device": str(pipeline.store.device), "model": spec_name,
              "settings": settings, "command": command_line(argv),
              "rows": rows}
    write_report(report, args.json)
    print(json.dumps(rows, indent=2))
    return report


if __name__ == "__main__":
    main()
