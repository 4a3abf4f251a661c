"""Token merging for speed on the SD1.5 / SDXL UNet: time per UNet call, vanilla vs merged, interleaved.

Random weights of the real architecture (the UNet configs are written below as dicts, no Hub), CFG batch of 2,
77 text tokens. Every method is timed once per repeat, in rotating order, after warm-up; rows hold medians and
the ratio to vanilla in the same mode. Modes: ``eager`` (plain calls; on CUDA timed with CUDA events) and
``graph`` (CUDA only: each method's UNet call captured once as a CUDA graph and replayed, i.e. GPU-bound time,
the setting of the issue's targets). The timestep changes every call as in a denoising loop, so merging draws a
new random destination layout each step, inside the graph too. Peak memory is measured on an eager call.

    python benchmarks/image_speed.py --arch sd15 --device cuda --sizes 512,1024,2048 --ratios 0,0.5 \
        --max-downsample 1,2 --also-forced --json benchmarks/results/image_speed_sd15_h200.json
    python benchmarks/image_speed.py --arch sd15 --tiny --sizes 64 --min-tokens 0 --json /tmp/image_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402

from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS, apply_merging, merging_stats, remove_merging  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (values that differ from the class defaults).
SD15_UNET = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL_UNET = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# Same block layout, a few channels: for a quick CPU check of the script itself.
TINY = {
    "sd15": dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=8),
    "sdxl": dict(SDXL_UNET, block_out_channels=(32, 64, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 4), cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8),
}
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Method:
    name: str
    ratio: float = 0.0
    max_downsample: int | None = None
    min_tokens: int | None = None
    window: int = 0
    tomesd: bool = False  # the anchor of the targets: tomesd 0.1.3 with the same ratio and level
    crossattn: bool = False  # also merge the cross-attention queries (tomesd's merge_crossattn)
    mlp: bool = False  # also merge the feed-forward's input (tomesd's merge_mlp)
    share_plan: bool = False  # one plan per spatial transformer, reused by its deeper blocks

    def install(self, unet) -> None:
        remove_merging(unet)
        if "tomesd" in sys.modules:
            sys.modules["tomesd"].remove_patch(unet)
        if self.tomesd:
            import tomesd

            tomesd.apply_patch(unet, ratio=self.ratio, max_downsample=self.max_downsample or 1)
        elif self.ratio > 0:
            apply_merging(unet, self.ratio, self.max_downsample, min_tokens=self.min_tokens, window=self.window,
                          merge_crossattn=self.crossattn, merge_mlp=self.mlp, share_plan=self.share_plan)


VANILLA = Method("vanilla")


def unet_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The UNet benchmarks' ``--dtype`` (fp16 | bf16 | fp32); unset, fp16 on CUDA and fp32 on CPU."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return dtypes[name] if name else (torch.float16 if device.type == "cuda" else torch.float32)


def build_unet(arch: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = TINY[arch] if tiny else {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[arch]
    return UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()


def unet_inputs(unet, size: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Static inputs of one UNet call at ``size`` pixels; ``timestep`` is a device tensor updated in place."""
    g = torch.Generator().manual_seed(size)
    side = size // 8
    inputs = {"sample": torch.randn(batch, 4, side, side, generator=g),
              "timestep": torch.tensor(999.0),
              "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype, device=device)}
    inputs["timestep"] = inputs["timestep"].to(device)
    for key in ("sample", "encoder_hidden_states"):
        inputs[key] = inputs[key].to(device, dtype)
    return inputs


def call_unet(unet, inputs: dict) -> torch.Tensor:
    """Positional sample/timestep/text, as pipelines call it (tomesd's size hook reads ``args[0]``)."""
    return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                added_cond_kwargs=inputs.get("added_cond_kwargs")).sample


class Runner:
    """One method's UNet call at one size: eager, or captured once as a CUDA graph and replayed."""

    def __init__(self, unet, inputs: dict, graph: bool) -> None:
        self.unet, self.inputs, self.graph, self.output = unet, inputs, None, None
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._call()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self._call()

    def _call(self) -> torch.Tensor:
        return call_unet(self.unet, self.inputs)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self.output = self._call()
        else:
            self.graph.replay()
        return self.output


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call: CUDA events on a GPU, wall time on the CPU."""
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return measure

    def measure_cpu(fn):
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1000
    return measure_cpu


def peak_memory_mb(unet, inputs: dict, device: torch.device) -> tuple[float | None, float | None]:
    """(peak allocated, peak above what was allocated before the call) of one eager call, MiB; None on CPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call_unet(unet, inputs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def methods_for(args) -> list[Method]:
    methods = [VANILLA]
    downsamples = [None if d == "auto" else int(d) for d in args.max_downsample.split(",")]
    for ratio in (float(r) for r in args.ratios.split(",")):
        if ratio == 0:
            continue
        for md in downsamples:
            if args.tomesd:
                methods.append(Method(f"tomesd r={ratio} md={md or 1}", ratio, md or 1, tomesd=True))
            for window in (int(w) for w in args.windows.split(",")):
                label = f"merge r={ratio} md={md or 'auto'} window={window}"
                methods.append(Method(label, ratio, md, args.min_tokens, window))
                if args.also_forced and args.min_tokens > 0:
                    methods.append(Method(label + " forced", ratio, md, 0, window))
                if args.also_crossattn:
                    methods.append(Method(label + " +crossattn", ratio, md, args.min_tokens, window, crossattn=True))
                if args.also_shared_plan:
                    methods.append(Method(label + " shared-plan", ratio, md, args.min_tokens, window, share_plan=True))
                if args.also_mlp:
                    methods.append(Method(label + " +crossattn+mlp", ratio, md, args.min_tokens, window,
                                          crossattn=True, mlp=True))
    return methods


@dataclass
class Reference:
    """Each method's eager output, peak memory and merging stats at one size: what its timed rows compare to."""

    outputs: dict[str, torch.Tensor]
    peaks: dict[str, tuple[float | None, float | None]]
    stats: dict[str, dict]


def eager_reference(unet, inputs: dict, methods: list[Method], device) -> Reference:
    """Run every method once eagerly, before any capture: graph memory pools would count in the peaks."""
    reference = Reference({}, {}, {})
    for method in methods:
        method.install(unet)
        reference.peaks[method.name] = peak_memory_mb(unet, inputs, device)
        reference.outputs[method.name] = call_unet(unet, inputs).float()
        reference.stats[method.name] = merging_stats(unet)
    return reference


def make_runners(unet, inputs: dict, methods: list[Method], mode: str) -> tuple[dict, dict[str, str]]:
    """A runner per method in ``mode``, and the error of each method that cannot run so (e.g. one that cannot be
    captured): the rest of the run goes on without it."""
    runners, failures = {}, {}
    for method in methods:
        method.install(unet)
        try:
            runners[method.name] = Runner(unet, inputs, graph=mode == "graph")
        except RuntimeError as error:
            failures[method.name] = f"{type(error).__name__}: {error}"[:300]
            print(f"{method.name} ({mode}): {failures[method.name]}", flush=True)
    VANILLA.install(unet)  # captured graphs keep their merging; eager runners install theirs before each call
    return runners, failures


def interleaved_times(unet, inputs: dict, methods: list[Method], runners: dict, mode: str, args,
                      device) -> dict[str, list[float]]:
    """Each runner's milliseconds per call after the warm-up: methods rotated every repeat, the timestep walked down
    from 999 to 1."""
    timesteps = torch.linspace(999, 1, 50).round().to(device)
    measure = timer(device)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for repeat in range(args.warmup + args.repeats):
        rotated = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
        for method in rotated:
            if method.name not in runners:
                continue
            if mode == "eager":
                method.install(unet)
            inputs["timestep"].copy_(timesteps[repeat % len(timesteps)])
            elapsed = measure(runners[method.name])
            if repeat >= args.warmup:
                times[method.name].append(elapsed)
    VANILLA.install(unet)
    return times


def replay_diffs(inputs: dict, runners: dict, reference: Reference, mode: str) -> dict[str, float]:
    """Each captured call against the eager one at the same timestep (999): what capturing changed."""
    if mode != "graph":
        return {}
    inputs["timestep"].fill_(999.0)
    return {name: round(float((runner().float() - reference.outputs[name]).abs().max()), 6)
            for name, runner in runners.items()}


def method_row(method: Method, times: dict[str, list[float]], reference: Reference, replay_diff: dict[str, float],
               size: int, mode: str, args) -> dict:
    """One method's row: its median time against vanilla's, merging, memory and error against vanilla."""
    ms, vanilla_ms = statistics.median(times[method.name]), statistics.median(times["vanilla"])
    (peak, active), (base_peak, base_active) = reference.peaks[method.name], reference.peaks["vanilla"]
    stats, vanilla = reference.stats[method.name], reference.outputs["vanilla"]
    error = (reference.outputs[method.name] - vanilla).norm() / vanilla.norm()
    return {
        "method": method.name, "arch": args.arch, "size": size, "mode": mode, "batch": args.batch,
        "ratio": method.ratio, "max_downsample": method.max_downsample, "window": method.window,
        "min_tokens": method.min_tokens,
        "ms": round(ms, 3), "ratio_to_vanilla": round(ms / vanilla_ms, 3),
        "ms_min": round(min(times[method.name]), 3),
        "tokens_merged_per_call": stats["tokens_merged_per_call"],
        "blocks_merged_per_call": stats["blocks_merged_per_call"],
        "peak_memory_mb": None if peak is None else round(peak, 1),
        "peak_memory_ratio": None if peak is None else round(peak / base_peak, 3),
        "peak_above_start_ratio": None if active is None else round(active / base_active, 3),
        "relative_error_vs_vanilla": round(float(error), 5),
        "graph_vs_eager_max_abs_diff": replay_diff.get(method.name)}


@torch.no_grad()
def measure_size(unet, size: int, methods: list[Method], args, device, dtype) -> list[dict]:
    """Every method at one latent size, in each of ``args.modes``: a row each, or its error."""
    inputs = unet_inputs(unet, size, args.batch, device, dtype)  # timestep 999 until the timing loop
    reference = eager_reference(unet, inputs, methods, device)
    rows = []
    for mode in args.modes:
        runners, failures = make_runners(unet, inputs, methods, mode)
        times = interleaved_times(unet, inputs, methods, runners, mode, args, device)
        replay_diff = replay_diffs(inputs, runners, reference, mode)
        for method in methods:
            if method.name in failures:
                rows.append({"method": method.name, "arch": args.arch, "size": size, "mode": mode,
                             "error": failures[method.name]})
                continue
            rows.append(method_row(method, times, reference, replay_diff, size, mode, args))
            print(json.dumps(rows[-1]), flush=True)
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--sizes", default="512,1024,2048", help="comma-separated image sides in pixels")
    parser.add_argument("--ratios", default="0,0.5", help="comma-separated merge ratios (0 = vanilla, always run)")
    parser.add_argument("--max-downsample", default="auto",
                        help="comma-separated tomesd max_downsample values; auto = finest level with attention")
    parser.add_argument("--windows", default="0,32",
                        help="comma-separated matching windows in tokens (0 = global, as tomesd)")
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS,
                        help="the merge-only-where-it-pays threshold (tokens per block)")
    parser.add_argument("--also-forced", action="store_true",
                        help="also time every merged method with min_tokens=0, to see where merging stops paying")
    parser.add_argument("--also-crossattn", action="store_true",
                        help="also time every merged method with the cross-attention queries merged")
    parser.add_argument("--also-shared-plan", action="store_true",
                        help="also time every merged method with one plan per spatial transformer")
    parser.add_argument("--also-mlp", action="store_true",
                        help="also time every merged method with cross-attention and feed-forward merged")
    parser.add_argument("--tomesd", action="store_true",
                        help="also time tomesd 0.1.3 (pip install tomesd==0.1.3) with each ratio and max_downsample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--modes", default=None, help="eager,graph (default: both on CUDA, eager on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny channels, same block layout (CPU check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = unet_dtype(args.dtype, device)
    args.modes = (args.modes or ("eager,graph" if device.type == "cuda" else "eager")).split(",")
    if "graph" in args.modes and device.type != "cuda":
        parser.error("--modes graph needs --device cuda")
    unet = build_unet(args.arch, args.tiny, device, dtype)
    methods = methods_for(args)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += measure_size(unet, size, methods, args, device, dtype)
    report = benchmark_report(
        "image_speed", device_name(device),
        f"{args.arch} UNet2DConditionModel, random weights" + (" (tiny channels)" if args.tiny else ""),
        {"dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "text_tokens": TEXT_TOKENS,
         "repeats": args.repeats, "warmup": args.warmup, "modes": args.modes,
         "min_tokens": args.min_tokens, "torch": torch.__version__,
         "timing": "median ms per UNet call; CUDA events on GPU; methods interleaved, rotating order",
         "merging": "pipelines/diffusion/merging.py (sx=sy=2, random destinations, self-attention only)",
         "windows": args.windows},
        rows, argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
