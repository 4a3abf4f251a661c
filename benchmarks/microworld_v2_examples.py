"""Which seed shows each micro-world example's control in the image tab's A/B view: every example that turns a
control on, rendered off and on (``ImagePipeline.generate`` with ``compare="controls off"``, batch 1, as the tab
runs it) for seeds 0-5, both images scored by the v2 scorer against the objects the prompt names, and a contact
sheet of the chosen seeds (left off, right on).

    PYTHONPATH=. python benchmarks/microworld_v2_examples.py --seeds 6 \
        --json benchmarks/results/microworld_v2_examples_cpu.json \
        --png benchmarks/results/microworld_v2_examples_cpu.png

When one example changes (its prompt, its controls, the compass encoder), ``--only TEXT --rendered OLD.json``
renders only the examples whose prompt contains TEXT and keeps every other example's rows from OLD.json; each row
records the command that rendered it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.microworld import scenes_v2  # noqa: E402
from pipelines.microworld.compass_v2 import compass_angle  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.presets import MICROWORLD_MODEL  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

OBJECT = re.compile(rf"(?:({'|'.join(scenes_v2.STYLES)}) )?({'|'.join(scenes_v2.COLOURS)}) "
                    rf"({'|'.join(scenes_v2.SHAPES)})")
GLOBAL_STYLE = re.compile(rf"in ({'|'.join(scenes_v2.STYLES)}) style")
SCORED = ("valid", "binding", "leakage", "style_agreement", "heading_error")
TILE = 128


def example_truth(example: Any) -> dict[str, Any]:
    """The objects ``example``'s prompt names (colour, shape, a per-object or the global style) and, for a compass
    example, each named object's heading (the inverse of ``compass_angle``)."""
    global_style = GLOBAL_STYLE.search(example.prompt)
    headings = {o["name"]: (90.0 - float(o["angle"])) % 360 for o in json.loads(example.compass or "[]")}
    assert all(compass_angle(h) == (90.0 - h) % 360 for h in headings.values())
    objects = []
    for style, colour, shape in OBJECT.findall(example.prompt.replace("[", "").replace("]", "")):
        obj = {"shape": shape, "colour": colour}
        if style or global_style:
            obj["style"] = style or global_style.group(1)
        if shape in headings:
            obj["heading"] = headings[shape]
        objects.append(obj)
    return {"objects": objects}


def request_of(example: Any, seed: int) -> ImageRequest:
    return ImageRequest(model=MICROWORLD_MODEL, prompt=example.prompt, binding=example.binding, lpa=example.lpa,
                        style=example.style, isolate=example.isolate, compass=example.compass,
                        compass_encoder=example.compass_encoder, steps=example.steps, cfg=example.cfg, seed=seed,
                        preview_every=0, compare="controls off")


def scores(path: str, truth: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in score_file(path, truth).items() if k in SCORED}


def labelled(off: str, on: str, text: str) -> np.ndarray:
    """One sheet row: the off and on images side by side above a caption."""
    images = [Image.open(p).convert("RGB").resize((TILE, TILE)) for p in (off, on)]
    row = Image.new("RGB", (2 * TILE + 4, TILE + 28), "white")
    for index, image in enumerate(images):
        row.paste(image, (index * (TILE + 4), 0))
    ImageDraw.Draw(row).text((2, TILE + 2), text, fill="black")
    return np.asarray(row)


def render(examples: list[Any], seeds: int) -> list[dict[str, Any]]:
    """Per example with a control on: off/on scores and image paths for seeds ``0 .. seeds - 1``."""
    pipeline = ImagePipeline(ModelStore(device=torch.device("cpu")))
    rows = []
    for example in (e for e in examples if request_of(e, 0).controlled):
        truth = example_truth(example)
        units = []
        for seed in range(seeds):
            result = [e for e in pipeline.generate(request_of(example, seed)) if isinstance(e, Result)][0]
            off, on = result.baseline.value[0], result.value[0]
            units.append({"seed": seed, "off": scores(off, truth), "on": scores(on, truth), "paths": [off, on]})
            print(example.prompt, seed, units[-1]["off"], units[-1]["on"], flush=True)
        rows.append({"prompt": example.prompt, "truth": truth, "units": units})
    return rows


def merged_rows(examples: list[Any], fresh: list[dict[str, Any]], rendered: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows in ``examples``' order: the freshly rendered ones, else the ones ``rendered`` holds (each keeps the
    command that rendered it); a prompt that is no longer an example is dropped."""
    by_prompt = {row["prompt"]: {"command": rendered["command"], **row} for row in rendered["rows"]}
    by_prompt.update({row["prompt"]: row for row in fresh})
    return [by_prompt[e.prompt] for e in examples if e.prompt in by_prompt]


def main(argv: list[str] | None = None) -> dict:
    from components.image_tab import MICROWORLD_EXAMPLES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--json", required=True)
    parser.add_argument("--png", required=True)
    parser.add_argument("--rendered", help="a JSON this script wrote: redraw the sheet for the examples' current "
                                           "seeds from its images instead of rendering again")
    parser.add_argument("--only", help="render only the examples whose prompt contains this text and take every "
                                       "other example's rows from --rendered")
    args = parser.parse_args(argv)
    if args.only and not args.rendered:
        parser.error("--only needs --rendered: the JSON that the other examples' rows come from")
    os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", tempfile.mkdtemp(prefix="mw-examples-"))
    rendered = json.load(open(args.rendered)) if args.rendered else None
    if args.only:
        fresh = render([e for e in MICROWORLD_EXAMPLES if args.only in e.prompt], args.seeds)
        rows = merged_rows(MICROWORLD_EXAMPLES, [{**row, "command": command_line(argv)} for row in fresh], rendered)
    else:
        rows = rendered["rows"] if rendered else render(MICROWORLD_EXAMPLES, args.seeds)
    chosen = {e.prompt: e.seed for e in MICROWORLD_EXAMPLES}
    tiles = []
    for row in rows:
        row["example_seed"] = chosen[row["prompt"]]
        unit = next(u for u in row["units"] if u["seed"] == row["example_seed"])
        tiles.append(labelled(*unit["paths"], f"seed {unit['seed']}: {row['prompt'][:40]}"))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(args.png)
    redrawn = rendered and not args.only
    report = {"command": rendered["command"] if redrawn else command_line(argv), "model": MICROWORLD_MODEL,
              "rows": rows}
    if redrawn:
        report["sheet_command"] = command_line(argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
