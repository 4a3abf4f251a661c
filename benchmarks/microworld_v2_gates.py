"""Sanity gates of a micro-world v2 model (issue 22, item 3), measured through the served path
(``ImagePipeline.generate``) before any control-effect claim.

1. single-object colour accuracy (>= 0.9): "a blue star" etc. for every colour x shape; the largest detected
   object must wear the asked colour (an invalid image counts as wrong).
2. heading error (<= 20 deg, with the arrow found in >= half the images) for captioned headings: "a green arrow
   pointing left" in each of 8 directions; mean angular error over the images where an arrow was found.
3. noise presence (<= 0.1): uniform, smooth and blotchy colour noise and dense colour blobs on the ground, scored
   against real scene truths by the v2 scorer; rendered ground-truth scenes must score >= 0.9 at the same time,
   or the scorer is broken rather than strict.
4. oracle binding gain (> 0 with a 95 % CI excluding zero): the held-out swapped-colour prompts, off and on in one
   A/B request, the oracle confining each object's tokens (its colour word, and by default its noun) to its own
   box (-inf outside, conditional half, every layer and step; boxes: left and right halves); the paired
   difference of binding F1 per (prompt, seed) with a bootstrap 95 % interval.

    python benchmarks/microworld_v2_gates.py --json benchmarks/results/microworld_v2_gates.json \
        --sheet benchmarks/results/microworld_v2_gates.png            # GPU: ~1-2 minutes
    python benchmarks/microworld_v2_gates.py --model FOLDER --gate-seeds 1 --gate-stride 20 --steps 2 \
        --device cpu --json /tmp/gates.json                           # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.control_effect_v2 import base_request, contact_sheet, make_pool, serve  # noqa: E402
from benchmarks.report import bootstrap_interval, command_line, write_report  # noqa: E402
from pipelines.diffusion.attention import KeyBias  # noqa: E402
from pipelines.diffusion.compass import outside_box_mask  # noqa: E402
from pipelines.diffusion.prompts import end_positions, token_positions  # noqa: E402
from pipelines.microworld import scenes_v2  # noqa: E402
from pipelines.microworld.scenes import BACKGROUND, PALETTE, smooth_noise  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file, score_image  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.presets import MICROWORLD_MODEL  # noqa: E402
from pipelines.tabs.image import MAX_BATCH, ImagePipeline, ImageRequest  # noqa: E402

THRESHOLDS = {"single_object_colour_accuracy": 0.9, "heading_error_deg": 20.0, "noise_presence": 0.1}
MIN_HEADING_COVERAGE = 0.5
MIN_GROUND_TRUTH_PRESENCE = 0.9
ORACLE_BOXES = ((0.04, 0.2, 0.46, 0.8), (0.54, 0.2, 0.96, 0.8))  # object 1 on the left, object 2 on the right
NOISE_KINDS = ("uniform", "smooth", "blotches", "blobs_on_ground")


@dataclass
class OracleRequest(ImageRequest):
    """An image request with the oracle on: "colour", "phrase" (colour and noun) or "phrase+eot" (and the end
    tokens masked everywhere) confined to ``ORACLE_BOXES``; the objects are read from the prompt's pairs."""

    oracle: str = ""
    oracle_pairs: tuple[tuple[str, str], ...] = ()

    @property
    def controlled(self) -> bool:
        return bool(self.oracle) or super().controlled


class OraclePipeline(ImagePipeline):
    """The served image pipeline; an ``OracleRequest`` adds the oracle's key biases to the run's attention control
    after the served controls are set up (everything else is the served path unchanged)."""

    def prepare_controls(self, pipe: Any, arch: str, request: ImageRequest, parsed: Any, control: Any,
                         call: dict[str, Any], info: dict[str, Any]) -> Any:
        binding = super().prepare_controls(pipe, arch, request, parsed, control, call, info)
        if getattr(request, "oracle", ""):
            control.biases.extend(oracle_biases(pipe.tokenizer, parsed.text, request.oracle_pairs, request.oracle))
            info.setdefault("controls", {})["oracle"] = request.oracle
        return binding


def oracle_biases(tokenizer: Any, text: str, pairs: tuple[tuple[str, str], ...], mode: str) -> list[KeyBias]:
    """-inf outside object k's box on its colour word (and noun unless ``mode`` is "colour"); "phrase+eot" also
    masks the end tokens (the causal encoder's summary of the whole prompt) for every query."""
    biases, start = [], 0
    for (colour, shape), box in zip(pairs, ORACLE_BOXES):
        tokens = []
        for word in (colour,) if mode == "colour" else (colour, shape):
            begin = text.index(word, start)
            start = begin + len(word)
            tokens += token_positions(tokenizer, text, begin, start)
        biases.append(KeyBias(tokens=tokens, region=outside_box_mask(box), label="oracle"))
    if mode == "phrase+eot":
        biases.append(KeyBias(tokens=end_positions(tokenizer, text), label="oracle-eot"))
    return biases


def seed_blocks(seeds: int, batch: int) -> list[tuple[int, int]]:
    return [(first, min(batch, seeds - first)) for first in range(0, seeds, batch)]


def render(pipeline: ImagePipeline, args: argparse.Namespace, prompt: str, cls: type = ImageRequest,
           **fields: Any) -> tuple[list[str], list[str]]:
    """(images, baseline images) of ``prompt`` for seeds 0 .. gate_seeds - 1, ``batch`` per served request."""
    on, off = [], []
    for first, count in seed_blocks(args.gate_seeds, args.batch):
        images, baseline, _ = serve(pipeline, base_request(args, first, count, cls, prompt=prompt, **fields))
        on += images
        off += baseline
    return on, off


def colour_gate(pipeline: ImagePipeline, args: argparse.Namespace, pool: Executor, sheet: list) -> dict[str, Any]:
    pending = []
    for prompt, colour, shape in scenes_v2.single_object_prompts()[::args.gate_stride]:
        paths, _ = render(pipeline, args, prompt)
        sheet.append((f"colour gate: {prompt}", [Image.open(p) for p in paths]))
        truth = {"objects": [{"shape": shape, "colour": colour}]}
        pending += [(colour, shape, pool.submit(score_file, path, truth)) for path in paths]
    correct, shaped, valid = [], [], []
    for colour, shape, future in pending:
        score = future.result()
        largest = max(score["detections"], key=lambda d: d["area"]) if score["detections"] else None
        correct.append(float(largest is not None and largest["colour"] == colour))
        shaped.append(float(largest is not None and largest["shape"] == shape))
        valid.append(score["valid"])
    return {"value": float(np.mean(correct)), "shape_accuracy": float(np.mean(shaped)),
            "validity": float(np.mean(valid)), "images": len(correct)}


def heading_gate(pipeline: ImagePipeline, args: argparse.Namespace, pool: Executor, sheet: list) -> dict[str, Any]:
    pending = []
    for prompt, heading in scenes_v2.heading_prompts()[::args.gate_stride]:
        paths, _ = render(pipeline, args, prompt)
        sheet.append((f"heading gate: {prompt}", [Image.open(p) for p in paths]))
        truth = {"objects": [{"shape": "arrow", "colour": scenes_v2.FAVOURITE["arrow"], "heading": heading}]}
        pending += [pool.submit(score_file, path, truth) for path in paths]
    errors = np.array([future.result()["heading_error"] for future in pending])
    found = np.isfinite(errors)
    return {"value": float(errors[found].mean()) if found.any() else float("nan"),
            "coverage": float(found.mean()), "images": len(errors)}


def noise_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``NOISE_KINDS`` in turn: uniform pixels, smooth colour noise, pale blotches, and dense blobs of palette
    colours on the ground colour (an image that passes the ground check, so only the precision term and the
    clutter check stand between it and a score)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = NOISE_KINDS[index % len(NOISE_KINDS)]
        if kind == "uniform":
            image = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
        elif kind == "smooth":
            image = np.stack([smooth_noise(rng, size, 4) for _ in range(3)], -1) * 127.5 + 127.5
        elif kind == "blotches":
            image = np.stack([smooth_noise(rng, size, 8) for _ in range(3)], -1) * 90 + 160
        else:
            image = np.tile(np.array(BACKGROUND, np.float32), (size, size, 1))
            colours = list(PALETTE.values())
            for _ in range(3):
                field = smooth_noise(rng, size, 8)
                image[field > np.quantile(field, 0.9)] = colours[rng.integers(len(colours))]
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def noise_gate(count: int, size: int) -> dict[str, Any]:
    layouts = scenes_v2.sample_layouts(count, 12345, size)
    images, coverage = scenes_v2.render_layouts(layouts)
    truths = scenes_v2.truths(layouts, coverage)
    noise = [score_image(image, truth) for image, truth in zip(noise_images(count, size), truths)]
    real = [score_image(image, truth)["presence"] for image, truth in zip(scenes_v2.to_uint8(images), truths)]
    per_kind = {kind: {"presence": float(np.mean([s["presence"] for s in noise[k::len(NOISE_KINDS)]])),
                       "validity": float(np.mean([s["valid"] for s in noise[k::len(NOISE_KINDS)]]))}
                for k, kind in enumerate(NOISE_KINDS) if noise[k::len(NOISE_KINDS)]}
    return {"value": float(np.mean([s["presence"] for s in noise])),
            "binding": float(np.mean([s["binding"] for s in noise])),
            "validity": float(np.mean([s["valid"] for s in noise])), "kinds": per_kind,
            "ground_truth_presence": float(np.mean(real)), "images": count}


def oracle_gate(pipeline: ImagePipeline, args: argparse.Namespace, pool: Executor, sheet: list) -> dict[str, Any]:
    pending = []
    for prompt, pairs in scenes_v2.swapped_prompts()[::args.gate_stride]:
        truth = {"objects": [{"shape": s, "colour": c} for c, s in pairs]}
        oracle, baseline = render(pipeline, args, prompt, OracleRequest, compare="controls off",
                                  oracle=args.oracle_tokens, oracle_pairs=tuple(tuple(p) for p in pairs))
        sheet.append((f"oracle gate: {prompt} (off)", [Image.open(p) for p in baseline]))
        sheet.append((f"oracle gate: {prompt} (oracle on)", [Image.open(p) for p in oracle]))
        pending += [(pool.submit(score_file, off, truth), pool.submit(score_file, on, truth))
                    for off, on in zip(baseline, oracle)]
    off = np.array([a.result()["binding"] for a, _ in pending])
    on = np.array([b.result()["binding"] for _, b in pending])
    difference = on - off
    low, high = bootstrap_interval(difference, args.bootstrap)
    return {"value": float(difference.mean()), "off": float(off.mean()), "on": float(on.mean()),
            "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0), "units": len(difference),
            "oracle_tokens": args.oracle_tokens}


def measure(pipeline: ImagePipeline, args: argparse.Namespace, pool: Executor, sheet: list) -> dict[str, Any]:
    return {"single_object_colour_accuracy": colour_gate(pipeline, args, pool, sheet),
            "heading_error_deg": heading_gate(pipeline, args, pool, sheet),
            "noise_presence": noise_gate(args.noise, scenes_v2.SIZE),
            "oracle_binding_gain": oracle_gate(pipeline, args, pool, sheet)}


def sheet_rows(rows: list[tuple[str, list]], per_gate: int = 4) -> list[tuple[str, list]]:
    """The first ``per_gate`` rows of each gate (oracle rows come in off, on pairs), for a sheet of sensible size."""
    kept: dict[str, int] = {}
    chosen = []
    for label, images in rows:
        gate = label.split(":")[0]
        if kept.get(gate, 0) < per_gate:
            kept[gate] = kept.get(gate, 0) + 1
            chosen.append((label, images))
    return chosen


def passed(gates: dict[str, Any]) -> dict[str, bool]:
    colour, heading = gates["single_object_colour_accuracy"], gates["heading_error_deg"]
    noise, oracle = gates["noise_presence"], gates["oracle_binding_gain"]
    return {"single_object_colour_accuracy": colour["value"] >= THRESHOLDS["single_object_colour_accuracy"],
            "heading_error_deg": bool(heading["value"] <= THRESHOLDS["heading_error_deg"]
                                      and heading["coverage"] >= MIN_HEADING_COVERAGE),
            "noise_presence": bool(noise["value"] <= THRESHOLDS["noise_presence"]
                                   and noise["ground_truth_presence"] >= MIN_GROUND_TRUTH_PRESENCE),
            "oracle_binding_gain": bool(oracle["excludes_zero"] and oracle["value"] > 0)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MICROWORLD_MODEL, help="the preset name or a v2 pipeline folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gate-seeds", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--gate-stride", type=int, default=1, help="every n-th prompt of each gate (smoke runs)")
    parser.add_argument("--batch", type=int, default=MAX_BATCH)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--scheduler", default="default")
    parser.add_argument("--oracle-tokens", default="phrase", choices=["colour", "phrase", "phrase+eot"])
    parser.add_argument("--noise", type=int, default=60)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=0, help="scoring processes (0 = inline)")
    parser.add_argument("--json")
    parser.add_argument("--sheet", help="contact sheet PNG: the first 4 rows of each gate (oracle: off, on)")
    args = parser.parse_args(argv)
    pool = make_pool(args.workers)
    pipeline = OraclePipeline(ModelStore(device=torch.device(args.device)), "auto")
    sheet: list = []
    gates = measure(pipeline, args, pool, sheet)
    pool.shutdown()
    verdict = passed(gates)
    report = {"benchmark": "microworld_v2_gates", "device": str(pipeline.store.device),
              "model": pipeline.spec_for(args.model).name, "command": command_line(argv),
              "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "thresholds": {**THRESHOLDS, "heading_coverage": MIN_HEADING_COVERAGE,
                             "ground_truth_presence": MIN_GROUND_TRUTH_PRESENCE,
                             "oracle_binding_gain": "> 0 with a 95 % CI excluding zero"},
              "gates": gates, "passed": verdict, "all_passed": all(verdict.values())}
    if args.sheet:
        contact_sheet(sheet_rows(sheet), args.sheet)
    write_report(report, args.json)
    print({k: round(v["value"], 4) for k, v in gates.items()}, verdict, flush=True)
    return report


if __name__ == "__main__":
    main()
