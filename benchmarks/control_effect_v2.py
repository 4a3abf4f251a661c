"""What each image control does to the picture, on micro-world v2, through the served path: the same (prompt, seed)
units rendered with the control off and on by ``ImagePipeline.generate`` (its A/B mode: one request renders the
baseline and the controlled run for up to 8 seeds), each image scored by the v2 scorer (precision and validity),
and the paired difference reported with a bootstrap 95 % interval. The sanity gates (benchmarks/
microworld_v2_gates.py) run first, on the same loaded model, and go into the same JSON.

Targets: binding F1 (extra detections penalised) for ToMe binding and leakage for the leakage fix, both on the
held-out swapped-colour prompts; per-object style agreement for LPA (two objects, "in X style"); heading error
for Compass Control (an arrow whose heading the caption does not name, the trained v2 compass encoder; coverage =
share of units where the scorer found the arrow). Every row also reports the other metrics and validity.

    # GPU (H100/H200): 300 units per control, gates, images (packed for the trip back) and a contact sheet
    python benchmarks/control_effect_v2.py --units 300 --json "$OUT/control_effect_v2.json" \
        --sheet "$OUT/control_effect_v2.png" --images outputs/control_effect_v2 --pack "$OUT"
    # CPU smoke run (a few minutes): harness only
    python benchmarks/control_effect_v2.py --units 2 --batch 2 --steps 4 --gate-seeds 1 --gate-stride 20 \
        --device cpu --json /tmp/effect.json
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.report import bootstrap_interval, command_line, write_report  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.tabs.image import MAX_BATCH, ImagePipeline, ImageRequest  # noqa: E402
from pipelines.microworld import scenes_v2  # noqa: E402
from pipelines.microworld.compass_v2 import arrow_scenes, compass_angle  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.presets import MICROWORLD_MODEL  # noqa: E402

CONTROLS = ("binding", "lpa", "compass", "leakfix")
TARGET = {"binding": "binding", "lpa": "style_agreement", "compass": "heading_error", "leakfix": "leakage"}
BETTER = {"binding": 1, "presence": 1, "found": 1, "leakage": -1, "style_agreement": 1, "heading_error": -1,
          "arrow_found": 1, "valid": 1}
METRICS = tuple(BETTER)
LPA_STYLES = ("striped", "dotted", "outline")
SCENE_SEED = 900_000_000  # benchmark scenes: an int seed, training draws from (seed, stage, step) tuples
VALIDITY_RATIO = 0.95  # issue 22: a control may cost at most 5 % of the baseline's valid images


@dataclass
class Prompt:
    """One prompt of a control: the request fields that turn the control on, and what the scorer expects."""

    fields: dict[str, Any]
    truth: dict[str, Any]


@dataclass
class Job:
    """One served request: ``prompt`` for seeds ``seed`` .. ``seed + batch - 1``, each seed one paired unit."""

    control: str
    prompt: Prompt
    seed: int
    batch: int


@dataclass
class Unit:
    """One paired unit: both images of a (prompt, seed) and their pending scores."""

    control: str
    prompt: str
    seed: int
    off_path: str
    on_path: str
    scores: dict[str, Future] = field(default_factory=dict)


def pair_phrases(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{colour} {shape}" for colour, shape in pairs]


def swapped_truth(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    return {"objects": [{"shape": shape, "colour": colour} for colour, shape in pairs]}


def binding_prompts() -> list[Prompt]:
    """The held-out swapped prompts with each object's colour and shape bracketed as one group."""
    out = []
    for text, pairs in scenes_v2.swapped_prompts():
        for phrase in pair_phrases(pairs):
            text = text.replace(phrase, f"[{phrase}]", 1)
        out.append(Prompt({"prompt": text, "binding": True}, swapped_truth(pairs)))
    return out


def leakfix_prompts() -> list[Prompt]:
    """The held-out swapped prompts, each object phrase encoded alone."""
    return [Prompt({"prompt": text, "isolate": ", ".join(pair_phrases(pairs))}, swapped_truth(pairs))
            for text, pairs in scenes_v2.swapped_prompts()]


def benchmark_layouts(count: int, seed: int, pick: Callable[[Any, int], bool]) -> tuple[Any, list[int]]:
    """Training-distribution scenes and the indices of ``count`` of them that ``pick`` accepts."""
    layouts = scenes_v2.sample_layouts(max(64, count * 8), seed)
    chosen = [i for i in range(len(layouts)) if pick(layouts, i)][:count]
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} of {count} benchmark scenes qualify")
    return layouts, chosen


def lpa_prompts(count: int) -> list[Prompt]:
    """Two objects of different shapes and one named style ("a red circle and a blue square, in dotted style");
    LPA routes the style words to the late layers. Target: each object's own fill matches the named style."""
    layouts, chosen = benchmark_layouts(count, SCENE_SEED + 1, lambda l, i: l.count[i] >= 2
                                         and l.shape[i, 0] != l.shape[i, 1])
    out = []
    for n, i in enumerate(chosen):
        style = LPA_STYLES[n % len(LPA_STYLES)]
        objects = [{"shape": o["shape"], "colour": o["colour"], "style": style} for o in layouts.objects(i)[:2]]
        text = scenes_v2.join_phrases([f"{o['colour']} {o['shape']}" for o in objects]) + f", in {style} style"
        out.append(Prompt({"prompt": text, "lpa": True}, {"objects": objects}))
    return out


def compass_prompts(count: int, encoder: str) -> list[Prompt]:
    """An arrow (the only one) and 0-2 other objects, the caption naming no heading; the compass object gives the
    arrow's heading and its drawn box, as the compass encoder was trained (compass_v2)."""
    layouts = arrow_scenes(count, (SCENE_SEED, 2), scenes_v2.SIZE)
    _, coverage = scenes_v2.render_layouts(layouts)
    out = []
    for i, boxes in enumerate(scenes_v2.boxes(coverage)):
        objects = layouts.objects(i)
        text = scenes_v2.join_phrases([scenes_v2.object_phrase(o, False, False) for o in objects])
        x0, y0, x1, y1 = boxes[0]
        box = [round(v / scenes_v2.SIZE, 4) for v in (x0, y0, x1 + 1, y1 + 1)]
        spec = [{"name": "arrow", "angle": round(compass_angle(objects[0]["heading"]), 2), "box": box}]
        truth = {"objects": [{"shape": o["shape"], "colour": o["colour"], **({"heading": o["heading"]} if k == 0
                                                                             else {})} for k, o in enumerate(objects)]}
        out.append(Prompt({"prompt": text, "compass": json.dumps(spec), "compass_encoder": encoder}, truth))
    return out


def plan(control: str, units: int, batch: int, encoder: str) -> list[Job]:
    """Requests that make ``units`` distinct (prompt, seed) units: prompt r mod P with seeds in blocks of ``batch``."""
    requests = math.ceil(units / batch)
    prompts = {"binding": lambda n: binding_prompts(), "leakfix": lambda n: leakfix_prompts(), "lpa": lpa_prompts,
               "compass": lambda n: compass_prompts(n, encoder)}[control](requests)
    return [Job(control, prompts[r % len(prompts)], (r // len(prompts)) * batch, min(batch, units - r * batch))
            for r in range(requests)]


def serve(pipeline: ImagePipeline, request: ImageRequest) -> tuple[list[str], list[str], dict[str, Any]]:
    """(controlled paths, baseline paths, stats) of one served request (baseline empty when nothing is on)."""
    for event in pipeline.generate(request):
        if isinstance(event, Result):
            return list(event.value), list(event.baseline.value) if event.baseline else [], dict(event.stats)
    raise RuntimeError("the image pipeline ended without a result")


def base_request(args: argparse.Namespace, seed: int, batch: int, cls: type = ImageRequest,
                 **fields: Any) -> ImageRequest:
    return cls(model=args.model, steps=args.steps, cfg=args.cfg, scheduler=args.scheduler, width=scenes_v2.SIZE,
               height=scenes_v2.SIZE, seed=seed, batch_size=batch, preview_every=0, fast=True, **fields)


def run_jobs(pipeline: ImagePipeline, jobs: list[Job], args: argparse.Namespace,
             pool: Executor) -> tuple[list[Unit], dict[str, Any]]:
    """Serve every job with A/B on; scoring runs in ``pool`` while the next request renders. Returns the units and
    what serving them cost (wall time, the served path's own per-run times, its fast-path backend and calls)."""
    units, served, start = [], [], time.perf_counter()
    for job in jobs:
        on, off, stats = serve(pipeline, base_request(args, job.seed, job.batch, compare="controls off",
                                                      **job.prompt.fields))
        served.append(stats)
        if len(off) != len(on):
            raise RuntimeError(f"{job.control}: the served path rendered no baseline (is the control on?)")
        for k, (off_path, on_path) in enumerate(zip(off, on)):
            unit = Unit(job.control, job.prompt.fields["prompt"], job.seed + k, off_path, on_path)
            unit.scores = {"off": pool.submit(score_file, off_path, job.prompt.truth),
                           "on": pool.submit(score_file, on_path, job.prompt.truth)}
            units.append(unit)
    cost = {"seconds": round(time.perf_counter() - start, 2), "requests": len(served),
            "median_controlled_s": float(np.median([st["time_s"] for st in served])),
            "median_baseline_s": float(np.median([st.get("baseline_time_s", float("nan")) for st in served])),
            "fast": sorted({str(st.get("fast")) for st in served}),
            "graph_replays": sum(int(st.get("graph_replays", 0)) for st in served),
            "eager_unet_calls": sum(int(st.get("eager_unet_calls", 0)) for st in served)}
    return units, cost


def unit_metrics(score: dict[str, Any], truth_has_arrow: bool) -> dict[str, float]:
    heading = score["heading_error"]
    return {"binding": score["binding"], "presence": score["presence"], "found": score["found"],
            "leakage": score["leakage"], "style_agreement": score["style_agreement"], "heading_error": heading,
            "arrow_found": float(math.isfinite(heading)) if truth_has_arrow else float("nan"),
            "valid": score["valid"]}


def paired(off: np.ndarray, on: np.ndarray, better: int, resamples: int) -> dict[str, Any]:
    """Means off and on over the units where both are defined, the mean paired difference (on - off), its
    bootstrap 95 % interval, whether it excludes zero and whether it excludes zero on the better side."""
    keep = np.isfinite(off) & np.isfinite(on)
    diff = on[keep] - off[keep]
    low, high = bootstrap_interval(diff, resamples)
    mean = lambda v: float(v.mean()) if len(v) else float("nan")  # noqa: E731
    excludes = bool(keep.any() and (low > 0 or high < 0))
    return {"n": int(keep.sum()), "off": mean(off[keep]), "on": mean(on[keep]), "difference": mean(diff),
            "ci95": [low, high], "excludes_zero": excludes,
            "improves": bool(excludes and (low > 0 if better > 0 else high < 0))}


def compare(off: list[dict[str, float]], on: list[dict[str, float]], resamples: int) -> dict[str, Any]:
    return {m: paired(np.array([u[m] for u in off], np.float64), np.array([u[m] for u in on], np.float64),
                      BETTER[m], resamples) for m in METRICS}


def validity(off: list[dict[str, float]], on: list[dict[str, float]]) -> dict[str, Any]:
    """Share of valid images off and on, and whether on keeps >= 95 % of the baseline's."""
    rate_off, rate_on = (float(np.mean([u["valid"] for u in runs])) if runs else float("nan") for runs in (off, on))
    ratio = rate_on / rate_off if rate_off > 0 else float("nan")
    return {"off": rate_off, "on": rate_on, "ratio": ratio, "kept": bool(ratio >= VALIDITY_RATIO)}


def scored(units: list[Unit], control: str) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Per unit, the metrics off and on (waits for the scoring processes)."""
    arrow = control == "compass"
    return ([unit_metrics(u.scores["off"].result(), arrow) for u in units],
            [unit_metrics(u.scores["on"].result(), arrow) for u in units])


def control_row(control: str, off: list[dict[str, float]], on: list[dict[str, float]], cost: dict[str, Any],
                resamples: int) -> dict[str, Any]:
    return {"method": control, "units": len(off), "target_metric": TARGET[control],
            "metrics": compare(off, on, resamples), "validity": validity(off, on), "images": 2 * len(off),
            "served": cost}


def write_units(path: Path, units: list[Unit], off: list[dict[str, float]], on: list[dict[str, float]]) -> None:
    """One JSON line per unit (prompt, seed, both images, both scores): any number can be traced to its images."""
    with path.open("a") as out:
        for unit, a, b in zip(units, off, on):
            out.write(json.dumps({"control": unit.control, "prompt": unit.prompt, "seed": unit.seed,
                                  "off": {"path": unit.off_path, **a}, "on": {"path": unit.on_path, **b}}) + "\n")


def unmeasurable(control: str, reason: str) -> dict[str, Any]:
    return {"method": control, "units": 0, "target_metric": TARGET[control], "measurable": False,
            "reason": reason, "metrics": {}, "validity": None}


def compass_folder(pipeline: ImagePipeline, model: str) -> Path | None:
    """The trained v2 compass encoder saved beside the model (train_v2 ``--stages compass``), if any."""
    folder = Path(pipeline.store.resolve(pipeline.spec_for(model)).location or "") / "compass"
    return folder if (folder / "compass_config.json").is_file() else None


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], path: str, size: int = scenes_v2.SIZE) -> None:
    """One labelled row per entry: the label strip above its images (A/B rows alternate off, on)."""
    strip = 14
    width = max(len(images) for _, images in rows) * size
    sheet = Image.new("RGB", (width, len(rows) * (size + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (size + strip)
        draw.text((2, top + 1), label, fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((size, size)), (c * size, top + strip))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def pair_row(control: str, units: list[Unit], pairs: int) -> list[tuple[str, list[Image.Image]]]:
    """The first ``pairs`` units of a control as off | on pairs, one row."""
    images = [Image.open(path) for u in units[:pairs] for path in (u.off_path, u.on_path)]
    return [(f"{control}: off | on pairs (first {min(pairs, len(units))} units)", images)]


def pack_images(images: Path, target: Path) -> list[Path]:
    """JPEG copies of every saved image (PNGs of these scenes are ~27 KB each: 3,000 of them would not fit the 64 MiB
    a device run returns) and units.jsonl, as a tar split into parts <= 15 MiB in ``target``; the PNGs, with their
    generation parameters, stay in ``images``. Unpack: cat control_effect_v2_jpeg.tar.part* | tar -x."""
    from pipelines.microworld.train_v2 import pack

    import shutil

    staging = images.with_name("control_effect_v2_jpeg")
    shutil.rmtree(staging, ignore_errors=True)
    for png in images.rglob("*.png"):
        copy = staging / png.relative_to(images).with_suffix(".jpg")
        copy.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            image.convert("RGB").save(copy, quality=90)
    if (images / "units.jsonl").is_file():
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "units.jsonl").write_text((images / "units.jsonl").read_text())
    return pack(staging, target)


def make_pool(workers: int) -> Executor:
    """Scoring processes (spawned: the parent holds CUDA); ``0`` scores inline, in this process."""
    if workers <= 0:
        return InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


class InlineExecutor(Executor):
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controls", default=",".join(CONTROLS))
    parser.add_argument("--units", type=int, default=300, help="paired (prompt, seed) units per control")
    parser.add_argument("--batch", type=int, default=MAX_BATCH, help="seeds per served request (<= 8)")
    parser.add_argument("--model", default=MICROWORLD_MODEL, help="the preset name or a v2 pipeline folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--scheduler", default="default")
    parser.add_argument("--compass-encoder", default="", help="a trained compass folder (default: <model>/compass)")
    parser.add_argument("--gates", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gate-seeds", type=int, default=8)
    parser.add_argument("--gate-stride", type=int, default=1)
    parser.add_argument("--oracle-tokens", default="phrase", choices=["colour", "phrase", "phrase+eot"])
    parser.add_argument("--noise", type=int, default=60)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)),
                        help="scoring processes (0 = score inline)")
    parser.add_argument("--images", default="outputs/control_effect_v2", help="where the served path saves PNGs")
    parser.add_argument("--sheet", help="contact sheet PNG")
    parser.add_argument("--sheet-pairs", type=int, default=6)
    parser.add_argument("--pack", help="also write JPEG copies of the images and units.jsonl here, as a tar split "
                                       "into parts <= 15 MiB (what a device run can return)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--batch must be 1..{MAX_BATCH} (the served path's batch limit)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks import microworld_v2_gates as gates

    args = parse(argv)
    os.environ["TOKENWORKS_OUTPUT_DIR"] = str(Path(args.images).resolve())
    Path(args.images).mkdir(parents=True, exist_ok=True)
    (Path(args.images) / "units.jsonl").unlink(missing_ok=True)
    pool = make_pool(args.workers)
    pipeline = gates.OraclePipeline(ModelStore(device=torch.device(args.device)), "auto")
    started = time.perf_counter()
    gate_sheet: list[tuple[str, list[Image.Image]]] = []
    report_gates = gates.measure(pipeline, args, pool, gate_sheet) if args.gates else {}
    sheet = gates.sheet_rows(gate_sheet)
    gate_seconds = time.perf_counter() - started
    encoder = args.compass_encoder or str(compass_folder(pipeline, args.model) or "")
    rows = []
    for control in [c.strip() for c in args.controls.split(",") if c.strip()]:
        if control not in CONTROLS:
            raise SystemExit(f"Unknown control {control!r}; choose from {', '.join(CONTROLS)}.")
        if control == "compass" and not encoder:
            rows.append(unmeasurable(control, "no trained compass encoder for this model: run train_v2 with "
                                              "--stages compass (it saves <model>/compass), or pass --compass-encoder"))
            continue
        units, cost = run_jobs(pipeline, plan(control, args.units, args.batch, encoder), args, pool)
        off, on = scored(units, control)
        rows.append(control_row(control, off, on, cost, args.bootstrap))
        write_units(Path(args.images) / "units.jsonl", units, off, on)
        sheet += pair_row(control, units, args.sheet_pairs)
        print(json.dumps({k: rows[-1][k] for k in ("method", "units", "served", "validity")}), flush=True)
    pool.shutdown()
    if args.sheet:
        contact_sheet(sheet, args.sheet)
    if args.pack:
        pack_images(Path(args.images), Path(args.pack))
    report = {"benchmark": "control_effect_v2", "device": str(pipeline.store.device),
              "model": pipeline.spec_for(args.model).name, "command": command_line(argv),
              "settings": {**{k: v for k, v in vars(args).items() if k != "json"},
                           "compass_encoder": encoder or None,
                           "unit": "one (prompt, seed); off and on rendered by one A/B request of the served path",
                           "heading_error": "degrees, over units where both runs found the arrow; arrow_found is "
                                            "the coverage"},
              "gates": {name: gate["value"] for name, gate in report_gates.items()},
              "gate_details": report_gates, "gates_passed": gates.passed(report_gates) if report_gates else {},
              "seconds": {"gates": round(gate_seconds, 1), "total": round(time.perf_counter() - started, 1)},
              "rows": rows}
    write_report(report, args.json)
    print(json.dumps({"gates": report["gates"], "seconds": report["seconds"]}), flush=True)
    return report


if __name__ == "__main__":
    main()
