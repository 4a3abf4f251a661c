"""Diagnostic for benchmarks/image_served.py: where the tab's time goes beside the stock call (pre-loop, loop,
post-loop of ``ImagePipeline.generate`` read off its events; stock variants with our generator and callbacks).

    python benchmarks/image_served_breakdown.py --arch sd15 --size 512 --json /tmp/breakdown.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_served import PROMPT, saved_models  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Progress, Result  # noqa: E402
from pipelines.diffusion.preview import AsyncPreviews  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402


def served_phases(served: ImagePipeline, request: ImageRequest) -> dict[str, float]:
    """Seconds to the first step, through the loop, and after the last step, from the events' arrival."""
    start = time.perf_counter()
    marks = {}
    for event in served.generate(request):
        now = time.perf_counter() - start
        if isinstance(event, Progress) and event.step == 1:
            marks["first_step"] = now
        if isinstance(event, Progress) and event.step == request.steps:
            marks["last_step"] = now
        if isinstance(event, Result):
            marks["result"] = now
    return {"to_first_step": marks["first_step"], "loop": marks["last_step"] - marks["first_step"],
            "after_loop": marks["result"] - marks["last_step"], "total": marks["result"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="/tmp/tokenworks-bench-models")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    store = ModelStore(packaged={})
    folder = saved_models(Path(args.models), args.arch, False, store.device, store.dtype)[args.arch]
    served = ImagePipeline(store)
    preview_map = served.load(folder).preview_map
    cls = StableDiffusionXLPipeline if args.arch == "sdxl" else StableDiffusionPipeline
    stock = cls.from_pretrained(folder, torch_dtype=store.dtype).to(store.device)
    stock.set_progress_bar_config(disable=True)
    text, size, steps = PROMPT.replace("[", "").replace("]", ""), args.size, args.steps

    def stock_call(generator, callback=None, inputs=("latents",)):
        extra = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=list(inputs)) if callback else {}
        return stock(text, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                     generator=generator, **extra).images

    def previewing(p, i, t, kwargs):
        previews.add(kwargs["latents"])
        previews.ready()
        return {}

    previews = AsyncPreviews(preview_map, upscale=8)
    variants = {
        "stock cuda generator": lambda: stock_call(torch.Generator("cuda").manual_seed(1)),
        "stock cpu generator": lambda: stock_call([torch.Generator("cpu").manual_seed(1)]),
        "stock + empty callback": lambda: stock_call(torch.Generator("cuda").manual_seed(1), lambda p, i, t, k: {}),
        "stock + async previews": lambda: stock_call(torch.Generator("cuda").manual_seed(1), previewing),
    }
    for fast in (False, True):
        for every in (1, 0):
            request = dict(prompt=PROMPT, model=folder, steps=steps, width=size, height=size, seed=1, fast=fast,
                           preview_every=every)
            variants[f"tab fast={fast} previews={every}"] = (
                lambda r=request: served_phases(served, ImageRequest(**r)))
    rows = []
    for name, call in variants.items():
        call()
        times, phases = [], []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if isinstance(out, dict):
                phases.append(out)
        row = {"method": name, "seconds": round(statistics.median(times), 4)}
        if phases:
            row.update({k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]})
        print(row, flush=True)
        rows.append(row)
    report = {"benchmark": "image_served_breakdown", "device": torch.cuda.get_device_name(), "model": folder,
              "settings": {"arch": args.arch, "size": size, "steps": steps, "command": command_line(argv)},
              "rows": rows}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
