"""Why ToMe binding hurts micro-world v2, one part at a time: held-out swapped-colour prompts (each object
bracketed) rendered through ``ImagePipeline.generate`` with binding off and with binding in several configurations,
every image scored by the v2 scorer (binding F1 with extra detections penalised, validity), and a contact sheet
(one row per configuration).

Configurations are ``BindingConfig`` overrides; the ``entropy-*``, ``grid16`` and ``official-latents`` rows are
diagnostics that patch the entropy refinement: its text or latent update dropped; maps read on the 16x16 grid
instead of 8x8; the refined latents fed to the next UNet call only while the scheduler steps from the unrefined
ones, as the official ``pipe_tome.py`` does (``latents_up`` is the UNet input, ``scheduler.step`` gets ``latents``;
ours hands the refined latents to the loop). That patch is CPU-only (eager UNet calls).

    PYTHONPATH=. python benchmarks/binding_microworld_v2.py --prompts 6 --seeds 2 \
        --json benchmarks/results/binding_microworld_v2_cpu.json --png benchmarks/results/binding_microworld_v2_cpu.png
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any, Iterator
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.control_effect_v2 import binding_prompts  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Result  # noqa: E402
from pipelines.diffusion import binding as tome  # noqa: E402
from pipelines.microworld.scorer_v2 import score_file  # noqa: E402
from pipelines.models import ModelStore  # noqa: E402
from pipelines.presets import MICROWORLD_MODEL  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402

NO_REFINEMENT = {"token_control_steps": 0, "attention_control_steps": 0}
VARIANTS: dict[str, dict[str, Any]] = {
    "official": {"cap_composite_norm": False},
    "official-merge-only": {"cap_composite_norm": False, **NO_REFINEMENT},
    "capped-merge-only": NO_REFINEMENT,
    "capped-merge-ets0": {**NO_REFINEMENT, "ets_step": 0},
    "capped": {},
    "capped-token-loss-only": {"attention_control_steps": 0},
    "capped-entropy-only": {"token_control_steps": 0},
    "capped-entropy-text-frozen": {},
    "capped-entropy-latents-frozen": {},
    "capped-grid16": {},
    "capped-official-latents": {},
}
TILE = 96


def without(part: str) -> Any:
    """The entropy refinement's gradients with the text (``part="text"``) or latent update dropped."""
    gradients = tome.SemanticBinding._entropy_gradients

    def patched(self: tome.SemanticBinding, t: Any, latents: torch.Tensor, positive: torch.Tensor):
        loss, grad_latents, grad_text = gradients(self, t, latents, positive)
        if part == "text":
            return loss, grad_latents, torch.zeros_like(grad_text)
        return loss, torch.zeros_like(grad_latents), grad_text
    return patched


def official_latents() -> tuple[Any, Any]:
    """A ``SemanticBinding.refine`` that keeps the trajectory's latents and leaves the refinement's change for the
    next UNet call without gradients (the loop's), and the UNet forward that adds it there."""
    pending: list[torch.Tensor | None] = [None]
    refine, forward = tome.SemanticBinding.refine, UNet2DConditionModel.forward

    def patched_refine(self: tome.SemanticBinding, step: int, t: Any, latents: torch.Tensor, positive: torch.Tensor):
        refined, positive = refine(self, step, t, latents, positive)
        pending[0] = refined - latents
        return latents, positive

    def patched_forward(self: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if pending[0] is not None and not torch.is_grad_enabled():
            sample, pending[0] = sample + pending[0], None
        return forward(self, sample, *args, **kwargs)
    return patched_refine, patched_forward


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The served path with binding's config (and, for the diagnostics, its entropy step) set to ``name``'s."""
    config = dataclasses.replace(tome.BindingConfig(), **VARIANTS[name])
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("pipelines.diffusion.controls.BindingConfig", lambda: config))
        if name.startswith("capped-entropy-") and name.endswith("-frozen"):
            part = name.removeprefix("capped-entropy-").removesuffix("-frozen")
            stack.enter_context(mock.patch.object(tome.SemanticBinding, "_entropy_gradients", without(part)))
        if name == "capped-official-latents":
            patched_refine, patched_forward = official_latents()
            stack.enter_context(mock.patch.object(tome.SemanticBinding, "refine", patched_refine))
            stack.enter_context(mock.patch.object(UNet2DConditionModel, "forward", patched_forward))
        if name == "capped-grid16":
            stack.enter_context(mock.patch.object(tome, "MIN_BINDING_GRID", 16))
        yield


def render(pipeline: ImagePipeline, prompt: str, seed: int, binding: bool, ets_step: int = -1
           ) -> tuple[str, dict[str, Any]]:
    """One served image; ``ets_step`` goes in the request (the plan takes it from there, not from the config)."""
    request = ImageRequest(model=MICROWORLD_MODEL, prompt=prompt if binding else prompt.replace("[", "").replace(
        "]", ""), binding=binding, ets_step=ets_step, steps=30, cfg=5.0, seed=seed, preview_every=0)
    result = [e for e in pipeline.generate(request) if isinstance(e, Result)][0]
    return result.value[0], result.stats


def run(pipeline: ImagePipeline, name: str, units: list[tuple[Any, int]]) -> dict[str, Any]:
    rows, start = [], time.perf_counter()
    for prompt, seed in units:
        with variant(name) if name != "off" else contextlib.nullcontext():
            path, stats = render(pipeline, prompt.fields["prompt"], seed, name != "off",
                                 VARIANTS.get(name, {}).get("ets_step", -1))
        score = score_file(path, prompt.truth)
        rows.append({"prompt": prompt.fields["prompt"], "seed": seed, "path": path, "binding": score["binding"],
                     "valid": score["valid"], "presence": score["presence"],
                     "token_norm": {k: v[-1] for k, v in stats.get("binding_token_norm", {}).items()}})
        print(name, rows[-1], flush=True)
    return {"binding": float(np.mean([r["binding"] for r in rows])),
            "valid": float(np.mean([r["valid"] for r in rows])),
            "presence": float(np.mean([r["presence"] for r in rows])),
            "seconds": round(time.perf_counter() - start, 1), "units": rows}


def sheet(results: dict[str, dict[str, Any]], path: str) -> None:
    """One row per configuration: its label and binding score, then its images in unit order."""
    rows = []
    for name, result in results.items():
        label = Image.new("RGB", (150, TILE + 2), "white")
        ImageDraw.Draw(label).text((2, TILE // 2 - 10), f"{name}\nbinding {result['binding']:.2f}", fill="black")
        tiles = [np.pad(np.asarray(Image.open(u["path"]).convert("RGB").resize((TILE, TILE))), ((0, 2), (0, 2), (0, 0)))
                 for u in result["units"]]
        rows.append(np.concatenate([np.asarray(label), *tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="this many held-out swapped prompts, every --stride-th")
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cuda runs every row but capped-official-latents (eager only)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(["off", *VARIANTS]))
    parser.add_argument("--json", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", tempfile.mkdtemp(prefix="binding-mw2-"))
    pipeline = ImagePipeline(ModelStore(device=torch.device(args.device)))
    units = [(p, s) for p in binding_prompts()[::args.stride][:args.prompts] for s in range(args.seeds)]
    results = {name: run(pipeline, name, units) for name in args.variants.split(",")}
    sheet(results, args.png)
    report = {"command": command_line(argv), "model": MICROWORLD_MODEL, "steps": 30, "cfg": 5.0,
              "variants": {name: VARIANTS.get(name, "binding off") for name in results}, "results": results}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
