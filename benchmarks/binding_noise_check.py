"""Is a ToMe-binding image still a picture? Micro-world scenes rendered through ``ImagePipeline.generate`` with
binding off and on (same seed), the share of pixels near the baseline's background colour for each, and a PNG
sheet (top row off, bottom row on). Issue 22: before the fix every binding image was coloured noise.

    python benchmarks/binding_noise_check.py --model V1_FOLDER --scenes 3 --json benchmarks/results/binding_noise_check.json \
        --png benchmarks/results/binding_noise_check.png
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.control_effect import benchmark_scenes, control_options  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

BACKGROUND_TOLERANCE = 24  # max channel difference from the background colour (8-bit)


def background_share(image: np.ndarray, background: np.ndarray) -> float:
    return float((np.abs(image.astype(int) - background).max(-1) < BACKGROUND_TOLERANCE).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a v1 micro-world pipeline folder (64 px; v1 weights left the repository with v2)")
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", tempfile.mkdtemp(prefix="binding-check-"))
    pipeline = ImagePipeline(ModelStore(device=torch.device(args.device)), "auto")
    units, tiles = [], []
    for scene in benchmark_scenes(args.scenes, 64):
        options = control_options("binding", scene)
        request = ImageRequest(model=args.model, steps=args.steps, cfg=args.cfg, width=64, height=64, seed=0,
                               preview_every=0, compare="controls off", **options)
        result = [event for event in pipeline.generate(request) if isinstance(event, Result)][0]
        on = np.asarray(Image.open(result.value[0]).convert("RGB"))
        off = np.asarray(Image.open(result.baseline.value[0]).convert("RGB"))
        background = np.median(off.reshape(-1, 3), axis=0)
        units.append({"prompt": options["prompt"], "background_share_off": background_share(off, background),
                      "background_share_on": background_share(on, background),
                      **{k: v for k, v in result.stats.items() if k.startswith("binding")}})
        tiles.append(np.concatenate([off, on], axis=0))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(args.png)
    report = {"command": command_line(argv), "model": args.model, "device": args.device, "steps": args.steps,
              "cfg": args.cfg, "units": units,
              "mean_background_share_off": float(np.mean([u["background_share_off"] for u in units])),
              "mean_background_share_on": float(np.mean([u["background_share_on"] for u in units]))}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
