"""Diagnostic for benchmarks/image_served.py: where the tab's time goes beside the stock call (pre-loop, loop,
post-loop of ``ImagePipeline.generate`` / ``VideoPipeline.generate`` read off its events; stock variants with our
generator, callbacks and decode). Video rows add the tab's own ``decode_s`` (VAE decode and post-processing) and
``export_s`` (MP4, strip and sidecar written in the request's wall time), and every row the peak allocation above
the weights (``peak_above_gb``) and the CUDA-graph pool its warm-up reserved (``pool_gb``). ``--knobs`` adds stock
rows with speed settings the tab does not use (they change the output's last bits: ``max_abs_diff`` says how much).

    python benchmarks/image_served_breakdown.py --arch sd15 --size 512 --json /tmp/breakdown.json
    python benchmarks/image_served_breakdown.py --arch video --size 512 --steps 25 \
        --knobs channels_last,vae_channels_last,sdpa_cudnn --json /tmp/breakdown_video.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_served import PROMPT, reserved, saved_models, timed, video_pipelines  # noqa: E402
from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import Progress, Result  # noqa: E402
from pipelines.diffusion.animatediff import decode  # noqa: E402
from pipelines.diffusion.preview import AsyncPreviews  # noqa: E402
from pipelines.models import ModelStore, module_nbytes  # noqa: E402
from pipelines.outputs import save_video  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402
from pipelines.tabs.video import VideoPipeline, VideoRequest  # noqa: E402


def served_phases(served: ImagePipeline | VideoPipeline, request: ImageRequest | VideoRequest) -> dict[str, float]:
    """Seconds to the first step, through the loop, and after the last step, from the events' arrival (video: and
    the tab's own decode and export seconds)."""
    start = time.perf_counter()
    marks: dict[str, float] = {}
    extra: dict[str, float] = {}
    for event in served.generate(request):
        now = time.perf_counter() - start
        if isinstance(event, Progress) and event.step == 1:
            marks["first_step"] = now
        if isinstance(event, Progress) and event.step == request.steps:
            marks["last_step"] = now
        if isinstance(event, Result):
            marks["result"] = now
            extra = {key: event.stats[key] for key in ("decode_s", "export_s") if key in event.stats}
    return {"to_first_step": marks["first_step"], "loop": marks["last_step"] - marks["first_step"],
            "after_loop": marks["result"] - marks["last_step"], "total": marks["result"], **extra}


def image_variants(args: argparse.Namespace, store: ModelStore) -> tuple[dict[str, Callable[[], Any]], float]:
    """Stock SD1.5/SDXL with our generator, callbacks and previews, and the tab with previews and fast path on/off."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = saved_models(Path(args.models), args.arch, args.tiny, store.device, store.dtype)[args.arch]
    served = ImagePipeline(store)
    preview_map = served.load(folder).preview_map
    cls = StableDiffusionXLPipeline if args.arch == "sdxl" else StableDiffusionPipeline
    stock = cls.from_pretrained(folder, torch_dtype=store.dtype).to(store.device)
    stock.set_progress_bar_config(disable=True)
    text, size, steps, device = PROMPT.replace("[", "").replace("]", ""), args.size, args.steps, store.device.type

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
        "stock device generator": lambda: stock_call(torch.Generator(device).manual_seed(1)),
        "stock cpu generator": lambda: stock_call([torch.Generator("cpu").manual_seed(1)]),
        "stock + empty callback": lambda: stock_call(torch.Generator(device).manual_seed(1), lambda p, i, t, k: {}),
        "stock + async previews": lambda: stock_call(torch.Generator(device).manual_seed(1), previewing),
    }
    for fast in (False, True):
        for every in (1, 0):
            request = dict(prompt=PROMPT, model=folder, steps=steps, width=size, height=size, seed=1, fast=fast,
                           preview_every=every)
            variants[f"tab fast={fast} previews={every}"] = (
                lambda r=request: served_phases(served, ImageRequest(**r)))
    plain = lambda: stock(text, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,  # noqa: E731
                          generator=torch.Generator(device).manual_seed(1), output_type="np").images
    variants.update(knob_variants(plain, stock, args.knobs))
    return variants, module_nbytes(stock) / 1e9


COMPILED: dict[int, Any] = {}  # id of a UNet -> its torch.compile wrapper, built once (compiled at warm-up)


@contextmanager
def knob(pipe: Any, name: str) -> Iterator[None]:
    """A speed setting the tab does not use (it changes the output's last bits), on the stock pipeline for one call:
    ``channels_last`` (UNet and VAE convolutions in NHWC, cuDNN's native bf16 layout), ``vae_channels_last``,
    ``sdpa_cudnn`` (cuDNN attention tried before FlashAttention-2), ``fused_qkv`` (diffusers' fused attention
    projections: one matmul for q, k, v), ``compile_unet`` (the UNet through ``torch.compile``, inductor's fused
    kernels; the first call compiles)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    modules = {"channels_last": [pipe.unet, pipe.vae], "vae_channels_last": [pipe.vae]}.get(name, [])
    for module in modules:
        module.to(memory_format=torch.channels_last)
    if name == "fused_qkv":
        pipe.fuse_qkv_projections()
    unet = pipe.unet
    if name == "compile_unet":
        if id(unet) not in COMPILED:
            COMPILED[id(unet)] = torch.compile(unet, fullgraph=True)
        pipe.unet = COMPILED[id(unet)]
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(order, set_priority=True) if name == "sdpa_cudnn" else nullcontext():
            yield
    finally:
        pipe.unet = unet
        if name == "fused_qkv":
            pipe.unfuse_qkv_projections()
        for module in modules:
            module.to(memory_format=torch.contiguous_format)


def knob_variants(call: Callable[[], Any], pipe: Any, names: list[str]) -> dict[str, Callable[[], dict[str, float]]]:
    """``call`` (returning an array) under each knob, with its largest difference from the plain call's output."""
    reference = np.asarray(call(), dtype=np.float32)

    def under(name: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            with knob(pipe, name):
                out = np.asarray(call(), dtype=np.float32)
            return {"max_abs_diff": float(np.abs(out - reference).max())}
        return run

    return {f"stock {name}": under(name) for name in names}


def video_variants(args: argparse.Namespace, store: ModelStore) -> tuple[dict[str, Callable[[], Any]], float]:
    """Stock AnimateDiff as benchmarks/image_served.py calls it, then with one thing of ours at a time (CPU
    generator, step callback, latent output + the tab's decode, the tab's MP4 export), and the tab with the fast
    path off, on through the eager static path (no graphs, no pool) and on through captured graphs."""
    folders = saved_models(Path(args.models), "video", args.tiny, store.device, store.dtype)
    served, name, stock = video_pipelines(folders, store)
    text, device = PROMPT.replace("[", "").replace("]", ""), store.device.type

    def stock_call(generator=None, **extra):
        generator = generator or torch.Generator(device).manual_seed(1)
        return stock(text, num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=7.5,
                     height=args.size, width=args.size, generator=generator, **extra).frames

    def served_call(backend: str, fast: bool = True) -> Callable[[], Any]:
        request = dict(prompt=PROMPT, model=name, steps=args.steps, width=args.size, height=args.size,
                       num_frames=args.frames, context_length=min(16, args.frames), seed=1, fast=fast)

        def call() -> dict[str, float]:
            os.environ["TOKENWORKS_FAST_BACKEND"] = backend
            return served_phases(served, VideoRequest(**request))
        return call

    reference = stock_call(output_type="np")[0]

    def chunked_decode() -> dict[str, float]:
        """Stock with ``decode_chunk_size=4``: a quarter of the VAE decode's activations (the request's peak); the
        VAE decodes frames independently, but other batch sizes may pick other kernels (not bit-identical on the
        CPU with one thread), so the tab keeps 16 unless this is 0 on the GPU too."""
        frames = stock_call(output_type="np", decode_chunk_size=4)[0]
        return {"max_abs_diff": float(np.abs(frames - reference).max())}

    variants = {
        "stock pil": stock_call,
        "stock cpu generator": lambda: stock_call(torch.Generator("cpu").manual_seed(1)),
        "stock + empty callback": lambda: stock_call(callback_on_step_end=lambda p, i, t, k: {},
                                                     callback_on_step_end_tensor_inputs=["latents"]),
        "stock latent + tab decode": lambda: decode(stock, stock_call(output_type="latent")),
        "stock decode_chunk_size=4": chunked_decode,
        "stock np + tab export": lambda: save_video(stock_call(output_type="np")[0], 8, {}),
        "tab fast=False": served_call("graph", fast=False),
        "tab fast=True eager": served_call("eager"),
        "tab fast=True graph": served_call("graph"),
        **knob_variants(lambda: stock_call(output_type="np"), stock, args.knobs),
    }
    return variants, module_nbytes(stock) / 1e9


def measure_rows(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                 weights_gb: float) -> list[dict[str, Any]]:
    """Each variant warmed once (the memory its warm-up reserved is ``pool_gb``), then timed ``repeats`` times."""
    rows = []
    for name, call in variants.items():
        grown = reserved(device)
        call()
        pool_gb = max(reserved(device) - grown, 0) / 1e9
        times, peaks, phases = [], [], []
        for _ in range(repeats):
            out: list[Any] = []
            seconds, above = timed(lambda: out.append(call()), device)
            times.append(seconds)
            peaks.append(above)
            if isinstance(out[0], dict):
                phases.append(out[0])
        row = {"method": name, "seconds": round(statistics.median(times), 4), "weights_gb": round(weights_gb, 3),
               "peak_above_gb": round(max(peaks), 3), "pool_gb": round(pool_gb, 3)}
        if phases:
            row.update({k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]})
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "video"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=16, help="video frames")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick check of the script")
    parser.add_argument("--knobs", default="", help="comma-separated stock rows with a speed setting the tab does "
                        "not use: channels_last, vae_channels_last, sdpa_cudnn, fused_qkv, compile_unet (see knob)")
    parser.add_argument("--models", default="/tmp/tokenworks-bench-models")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.knobs = [name for name in args.knobs.split(",") if name]
    store = ModelStore(packaged={})
    variants, weights_gb = (video_variants if args.arch == "video" else image_variants)(args, store)
    rows = measure_rows(variants, args.repeats, store.device, weights_gb)
    device = torch.cuda.get_device_name() if store.device.type == "cuda" else "cpu"
    report = {"benchmark": "image_served_breakdown", "device": device, "model": f"{args.arch} (random weights)",
              "settings": {"arch": args.arch, "size": args.size, "steps": args.steps, "frames": args.frames,
                           "tiny": args.tiny, "command": command_line(argv)},
              "rows": rows}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
