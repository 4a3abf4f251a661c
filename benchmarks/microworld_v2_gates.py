"""Sanity gates of a micro-world v2 model (issue 22, item 3), measured before any control-effect claim.

1. single-object colour accuracy (>= 0.9): "a blue star" etc. for every colour x shape; the largest detected
   object must wear the asked colour.
2. heading error (<= 20 deg) for captioned headings: "a green arrow pointing left" in each of 8 directions;
   mean angular error over the images where an arrow was found (coverage reported).
3. noise presence (<= 0.1): uniform, smooth and blotchy noise scored against real scene truths by the v2 scorer
   (rendered ground-truth scenes are scored too: they must score high, or the scorer is broken).
4. oracle binding gain (CI excludes zero, > 0): the held-out swapped-colour prompts with and without an oracle
   that masks each colour word's cross-attention outside its own object's box (-inf, conditional half, every
   layer and step); the paired difference of binding F1 per (prompt, seed) with a bootstrap 95 % interval.

    python benchmarks/microworld_v2_gates.py --model outputs/microworld_v2 --device cuda --seeds 8 \
        --json benchmarks/results/microworld_v2_gates.json --sheet benchmarks/results/microworld_v2_gates.png
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.control_effect import bootstrap_interval  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.image.attention import AttentionControl, KeyBias  # noqa: E402
from pipelines.image.compass import outside_box_mask  # noqa: E402
from pipelines.microworld import scenes_v2  # noqa: E402
from pipelines.microworld.scenes import smooth_noise  # noqa: E402
from pipelines.microworld.scorer_v2 import score_image  # noqa: E402

THRESHOLDS = {"single_object_colour_accuracy": 0.9, "heading_error_deg": 20.0, "noise_presence": 0.1}
ORACLE_BOXES = ((0.04, 0.2, 0.46, 0.8), (0.54, 0.2, 0.96, 0.8))  # object 1 on the left, object 2 on the right


def load(folder: str, device: torch.device) -> Any:
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompt: str, seeds: int, args: argparse.Namespace, control: AttentionControl | None = None):
    generators = [torch.Generator("cpu").manual_seed(s) for s in range(seeds)]
    call = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, height=args.size, width=args.size,
                num_images_per_prompt=seeds, generator=generators)
    if control is None:
        return pipe(prompt, **call).images
    with control:
        return pipe(prompt, callback_on_step_end=control.step_callback, **call).images


def colour_gate(pipe: Any, args: argparse.Namespace, sheet: list) -> dict[str, Any]:
    correct = []
    for prompt, colour, shape in scenes_v2.single_object_prompts()[::args.stride]:
        images = generate(pipe, prompt, args.seeds, args)
        sheet.append(images)
        truth = {"objects": [{"shape": shape, "colour": colour}]}
        for image in images:
            found = score_image(image, truth)["detections"]
            largest = max(found, key=lambda d: d["area"]) if found else None
            correct.append(float(largest is not None and largest["colour"] == colour))
    return {"value": float(np.mean(correct)), "images": len(correct)}


def heading_gate(pipe: Any, args: argparse.Namespace, sheet: list) -> dict[str, Any]:
    errors, found = [], []
    for prompt, heading in scenes_v2.heading_prompts()[::args.stride]:
        images = generate(pipe, prompt, args.seeds, args)
        sheet.append(images)
        truth = {"objects": [{"shape": "arrow", "colour": scenes_v2.FAVOURITE["arrow"], "heading": heading}]}
        for image in images:
            error = score_image(image, truth)["heading_error"]
            found.append(float(np.isfinite(error)))
            if np.isfinite(error):
                errors.append(error)
    return {"value": float(np.mean(errors)) if errors else float("nan"), "coverage": float(np.mean(found)),
            "images": len(found)}


def noise_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform noise, smooth colour noise and blotches on the ground colour, in turn."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        kind = index % 3
        if kind == 0:
            image = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:
            image = np.stack([smooth_noise(rng, size, 4) for _ in range(3)], -1) * 127.5 + 127.5
        else:
            image = np.stack([smooth_noise(rng, size, 8) for _ in range(3)], -1) * 90 + 160
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def noise_gate(count: int, size: int) -> dict[str, Any]:
    layouts = scenes_v2.sample_layouts(count, 12345, size)
    images, coverage = scenes_v2.render_layouts(layouts)
    truths = scenes_v2.truths(layouts, coverage)
    noise = [score_image(image, truth)["presence"] for image, truth in zip(noise_images(count, size), truths)]
    real = [score_image(image, truth)["presence"] for image, truth in zip(scenes_v2.to_uint8(images), truths)]
    return {"value": float(np.mean(noise)), "ground_truth_presence": float(np.mean(real)), "images": count}


def colour_positions(tokenizer: Any, prompt: str, colours: list[str]) -> list[int]:
    """Token position of each colour word, in order (every caption word is one token of the v2 tokenizer)."""
    positions, start = [], 0
    for colour in colours:
        index = prompt.index(colour, start)
        positions.append(len(tokenizer(prompt[:index])["input_ids"]) - 1)  # minus the end token
        start = index + len(colour)
    return positions


def oracle_gate(pipe: Any, args: argparse.Namespace, sheet: list) -> dict[str, Any]:
    off, on = [], []
    for prompt, pairs in scenes_v2.swapped_prompts()[::args.stride]:
        truth = {"objects": [{"shape": s, "colour": c} for c, s in pairs]}
        baseline = generate(pipe, prompt, args.seeds, args)
        control = AttentionControl(pipe.unet)
        for position, box in zip(colour_positions(pipe.tokenizer, prompt, [c for c, _ in pairs]), ORACLE_BOXES):
            control.biases.append(KeyBias(tokens=[position], region=outside_box_mask(box), label="oracle"))
        oracle = generate(pipe, prompt, args.seeds, args, control)
        sheet.append(baseline + oracle)
        off += [score_image(image, truth)["binding"] for image in baseline]
        on += [score_image(image, truth)["binding"] for image in oracle]
    difference = np.array(on) - np.array(off)
    low, high = bootstrap_interval(difference, args.bootstrap)
    return {"value": float(difference.mean()), "off": float(np.mean(off)), "on": float(np.mean(on)),
            "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0), "units": len(difference)}


def contact_sheet(rows: list[list[Image.Image]], path: str, size: int) -> None:
    width = max(len(r) for r in rows)
    sheet = Image.new("RGB", (width * size, len(rows) * size), (255, 255, 255))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image, (c * size, r * size))
    sheet.save(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder saved by pipelines.microworld.train_v2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=scenes_v2.SIZE)
    parser.add_argument("--noise", type=int, default=60)
    parser.add_argument("--stride", type=int, default=1, help="every n-th prompt of each gate (smoke runs)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--json")
    parser.add_argument("--sheet", help="contact sheet PNG: colour, heading and oracle (off | on) rows")
    args = parser.parse_args(argv)
    pipe = load(args.model, torch.device(args.device))
    sheet: list = []
    gates = {"single_object_colour_accuracy": colour_gate(pipe, args, sheet),
             "heading_error_deg": heading_gate(pipe, args, sheet),
             "noise_presence": noise_gate(args.noise, args.size),
             "oracle_binding_gain": oracle_gate(pipe, args, sheet)}
    passed = {"single_object_colour_accuracy": gates["single_object_colour_accuracy"]["value"]
              >= THRESHOLDS["single_object_colour_accuracy"],
              "heading_error_deg": gates["heading_error_deg"]["value"] <= THRESHOLDS["heading_error_deg"],
              "noise_presence": gates["noise_presence"]["value"] <= THRESHOLDS["noise_presence"],
              "oracle_binding_gain": gates["oracle_binding_gain"]["excludes_zero"]
              and gates["oracle_binding_gain"]["value"] > 0}
    report = {"benchmark": "microworld_v2_gates", "device": args.device, "model": args.model,
              "command": command_line(argv), "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
              "thresholds": {**THRESHOLDS, "oracle_binding_gain": "> 0 with a 95 % CI excluding zero"},
              "gates": gates, "passed": passed, "all_passed": all(passed.values())}
    if args.sheet:
        contact_sheet(sheet, args.sheet, args.size)
    write_report(report, args.json)
    print({k: round(v["value"], 4) for k, v in gates.items()}, passed, flush=True)
    return report


if __name__ == "__main__":
    main()
