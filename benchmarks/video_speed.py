"""Token merging on AnimateDiff's spatial layers: UNet time with merging on vs off, interleaved, same inputs.

Random weights of the real architecture (SD1.5 UNet + AnimateDiff v1-5-3 motion adapter, configs below as
dicts, no Hub), CFG batch of 2 videos, timesteps walked as a 25-step DDIM schedule would. Each repeat times
every method once in turn (interleaved), after warm-up; the table reports medians.

    python benchmarks/video_speed.py --device cuda --sizes 512,768 --frames 16 --json benchmarks/results/video_speed_h200.json
    python benchmarks/video_speed.py --tiny --json /tmp/video_speed_tiny.json      # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402

from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS, apply_merging, merging_stats, remove_merging  # noqa: E402

# stable-diffusion-v1-5 unet/config.json (the values that differ from UNet2DConditionModel's defaults).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# guoyww/animatediff-motion-adapter-v1-5-3 config.json.
ADAPTER_V153 = dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                    motion_mid_block_layers_per_block=1, motion_num_attention_heads=8, motion_norm_num_groups=32,
                    motion_max_seq_length=32, use_motion_mid_block=False)
TINY_UNET = dict(SD15_UNET, sample_size=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
TINY_ADAPTER = dict(ADAPTER_V153, block_out_channels=(8, 16, 16, 16), motion_layers_per_block=1,
                    motion_num_attention_heads=2, motion_norm_num_groups=4)
TEXT_TOKENS = 77


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    adapter = MotionAdapter(**(TINY_ADAPTER if tiny else ADAPTER_V153))
    return UNetMotionModel.from_unet2d(unet, adapter).to(device=device, dtype=dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_calls(unet, sample, context, timesteps, device) -> tuple[float, torch.Tensor]:
    """Seconds for one UNet call per timestep (the denoising loop without the scheduler), and the last output."""
    synchronize(device)
    start = time.perf_counter()
    for t in timesteps:
        out = unet(sample, t, encoder_hidden_states=context).sample
    synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: fp16 on CUDA)")
    parser.add_argument("--sizes", default="512", help="comma-separated video sides in pixels")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help=f"merge layers with at least this many tokens per frame (app default {DEFAULT_MIN_TOKENS})")
    parser.add_argument("--steps", type=int, default=5, help="UNet calls per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (CPU smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    unet = build_unet(args.tiny, device, dtype)
    methods = [("baseline", 0.0)] + [(f"merge r={r}", float(r)) for r in args.ratios.split(",")]
    timesteps = torch.linspace(999, 39, 25).round().long()[: args.steps].tolist()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        side = size // 8
        generator = torch.Generator().manual_seed(size)
        sample = torch.randn(2, 4, args.frames, side, side, generator=generator).to(device, dtype)
        context_dim = unet.config.cross_attention_dim
        context = torch.randn(2 * args.frames, TEXT_TOKENS, context_dim, generator=generator).to(device, dtype)
        times: dict[str, list[float]] = {name: [] for name, _ in methods}
        outputs: dict[str, torch.Tensor] = {}
        merged: dict[str, dict[str, int]] = {}
        peaks: dict[str, float] = {}
        for repeat in range(args.warmup + args.repeats):
            for name, ratio in methods:
                if ratio > 0:
                    apply_merging(unet, ratio, seed=0, min_tokens=args.min_tokens)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                elapsed, out = time_calls(unet, sample, context, timesteps, device)
                if device.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
                merged[name] = merging_stats(unet)
                remove_merging(unet)
                if repeat >= args.warmup:
                    times[name].append(elapsed / len(timesteps))
                outputs[name] = out.float()
        base = statistics.median(times["baseline"])
        for name, ratio in methods:
            median = statistics.median(times[name])
            error = (outputs[name] - outputs["baseline"]).norm() / outputs["baseline"].norm()
            rows.append({"method": name, "size": size, "frames": args.frames, "ratio": ratio,
                         "ms_per_unet_call": round(median * 1000, 2),
                         "speedup_vs_baseline": round(base / median, 3),
                         "tokens_merged_per_call": merged[name]["tokens_merged_per_call"],
                         "blocks_merged_per_call": merged[name]["blocks_merged_per_call"],
                         "relative_error_vs_baseline": round(float(error), 5),
                         "peak_memory_mb": round(peaks[name], 1) if name in peaks else None})
            print(json.dumps(rows[-1]))
    report = benchmark_report(
        "video_speed", device_name(device),
        "AnimateDiff (SD1.5 UNet + motion adapter v1-5-3 config), random weights"
        + (" — tiny configs" if args.tiny else ""),
        {"dtype": str(dtype).removeprefix("torch."), "batch": "2 (CFG)", "frames": args.frames,
         "text_tokens": TEXT_TOKENS, "unet_calls_per_run": len(timesteps), "repeats": args.repeats,
         "warmup": args.warmup, "min_tokens": args.min_tokens, "torch": torch.__version__,
         "merging": "pipelines/diffusion/merging.py on spatial transformer blocks only"},
        rows, argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
