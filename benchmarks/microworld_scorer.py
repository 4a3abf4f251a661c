"""Accuracy of the classical micro-world scorer on held-out generated scenes, clean and degraded (blur + noise,
roughly what a small VAE decoder adds): objects found with the right shape and colour, extra detections, style,
arrow heading error.

    python benchmarks/microworld_scorer.py --scenes 500 --json benchmarks/results/microworld_scorer.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from pipelines.microworld.scenes import make_scene, render  # noqa: E402
from pipelines.microworld.scorer import score_image  # noqa: E402

HELD_OUT = 700_000_000  # seeds never used for training (training uses seed * 10_000_000 onwards, seed < 70)


def degrade(image: Image.Image, seed: int, blur: float, noise: float) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for condition, blur, noise in (("clean", 0.0, 0.0), ("blur0.6+noise4", 0.6, 4.0), ("blur1+noise8", 1.0, 8.0)):
            start, scores, styles = time.perf_counter(), [], {}
            for seed in range(HELD_OUT, HELD_OUT + args.scenes):
                scene = make_scene(seed, size)
                image = render(scene)[0]
                if blur or noise:
                    image = degrade(image, seed, blur * size / 64, noise)
                result = score_image(image, scene)
                scores.append(result)
                styles.setdefault(scene.style, []).append(result["style_correct"])
            headings = np.array([s["heading_error"] for s in scores])
            headings = headings[np.isfinite(headings)]
            rows.append({"method": f"classical scorer, {condition}", "size": size, "scenes": args.scenes,
                         "objects": int(sum(len(make_scene(s, size).objects)
                                            for s in range(HELD_OUT, HELD_OUT + args.scenes))),
                         "shape_colour_accuracy": float(np.mean([s["binding"] for s in scores])),
                         "shape_accuracy": float(np.mean([s["presence"] for s in scores])),
                         "extra_detections_per_image": float(np.mean([s["extra_objects"] for s in scores])),
                         "style_accuracy": float(np.mean([s["style_correct"] for s in scores])),
                         "style_accuracy_by_style": {k: float(np.mean(v)) for k, v in sorted(styles.items())},
                         "arrow_heading_error_median_deg": float(np.median(headings)) if len(headings) else None,
                         "arrow_heading_error_p90_deg": float(np.percentile(headings, 90)) if len(headings) else None,
                         "arrows_scored": int(len(headings)),
                         "ms_per_image": round(1000 * (time.perf_counter() - start) / args.scenes, 2)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"benchmark": "microworld_scorer", "device": "cpu", "model": "classical (no weights)",
              "settings": {"scenes": args.scenes, "held_out_seeds_from": HELD_OUT,
                           "note": "objects per scene 1-3, styles uniform; degraded = Gaussian blur (px at 64 px) "
                                   "+ Gaussian pixel noise (std, 0-255)"},
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
