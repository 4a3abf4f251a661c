"""Where ToMe binding's time goes, without a GPU: UNet forwards and backwards per image of the served image tab
(``ImagePipeline.generate``, tiny random SD1.5 on the CPU; the counts do not depend on the model size) against the
official config's, counted from ``hutaiHang/ToMe`` ``pipe_tome.py``.

Per step with token refinement and per group the official code runs one anchor forward, ``token_refinement_steps``
forward+backward on the composite token and one unconditional forward for the anchor's own step; per step with
attention refinement up to ``attention_refinement_steps`` forward+backward on the latents. The tab runs the token
work of all groups in the same calls (a batch row per group): per step one classifier-free-guided anchor call (its
conditional half is the loss target), the same forward+backward steps plus one forward scoring the last proposal
(issue 22's back-off); then the entropy iterations, whose forwards stop after the last layer the loss reads.

    python benchmarks/binding_passes.py --json benchmarks/results/binding_passes_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.diffusion.binding import BindingConfig  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

PROMPT = "a [red hat] and a [blue car] in watercolor style"
MODEL = "tiny-sd15 (random weights)"


def official(steps: int, groups: int, config: BindingConfig) -> dict[str, Any]:
    """RunConfig2's passes per image (the entropy loop at its cap: an upper bound; it stops at a threshold)."""
    token_steps = config.scaled(config.token_control_steps, steps)
    attention_steps = config.scaled(config.attention_control_steps, steps)
    cap = config.attention_refinement_steps[0]
    forwards = groups * token_steps * (config.token_refinement_steps + 2) + attention_steps * cap
    backwards = groups * token_steps * config.token_refinement_steps + attention_steps * cap
    return {"method": f"official ToMe, {steps} steps (counted from pipe_tome.py, entropy at its cap)",
            "steps": steps, "denoising_forwards": steps, "refinement_forwards": forwards,
            "refinement_backwards": backwards}


def served(pipeline: ImagePipeline, steps: int) -> dict[str, Any]:
    """The tab's passes per image, counted by a hook on the UNet and by the binding's own counters."""
    unet = pipeline.load(MODEL).pipe.unet
    calls: list[bool] = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    try:
        result = pipeline.run(ImageRequest(prompt=PROMPT, model=MODEL, steps=steps, seed=1, binding=True, fast=False))
    finally:
        handle.remove()
    stats = result.stats
    forwards = stats["binding_unet_forwards"]
    return {"method": f"served image tab, {steps} steps", "steps": steps, "denoising_forwards": len(calls) - forwards,
            "refinement_forwards": forwards, "refinement_backwards": stats["binding_unet_backwards"],
            "forwards_with_gradients": sum(calls), "entropy_iterations": len(stats["binding_entropy_trace"]),
            "seconds_cpu": stats["time_s"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="30,50", help="denoising steps to count (30: the tab's default)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pipeline = ImagePipeline(ModelStore(packaged={}), "tiny")
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        rows += [official(steps, 2, BindingConfig()), served(pipeline, steps)]
        for row in rows[-2:]:
            print(row, flush=True)
    report = {"benchmark": "binding_passes", "device": "cpu", "model": MODEL,
              "settings": {"prompt": PROMPT, "command": command_line(argv)}, "rows": rows}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
