"""Served per-step time of the denoising loop, eager vs the fast path (pipelines/diffusion/fast.py), with the controls.

Random weights of the real architectures (SD1.5 and SDXL UNets from benchmarks/image_speed.py, AnimateDiff
v1-5-3 from benchmarks/video_speed.py; config dicts, no Hub), fp16 on CUDA, CFG batch of 2. A "step" is what
diffusers' loop does per step: CFG concat, ``scale_model_input``, the UNet call, guidance, ``scheduler.step``
(DDIM, or ``--scheduler default``: each model's own, as the app serves it), and advancing the control's step counter; previews and progress callbacks are left out. Configurations:
plain, token merging (r=0.5, the app's merge-only-where-it-pays threshold), LPA (content/style -inf routing,
t in [300, 650]), Compass CALL (two boxed objects), and all three together. The leakage fix and ToMe's
composite tokens only change the text embedding, so their per-step cost is the plain one.

For each (model, size): ``unet graph`` is the GPU-bound anchor (the plain UNet call captured once and replayed,
as benchmarks/image_speed.py, timed in the same rotation as the loops); then every configuration runs the same loop eager and through the fast path,
interleaved in rotating order, each timed with CUDA events over ``--steps`` steps after a warm-up round
(which also captures the graphs, reported as ``capture_s``), median of ``--repeats``, per UNet call (PNDM
makes one call more than its steps). ``max_abs_diff`` compares
the final latents of the eager and fast loops from the same seed and noise. ``config_unet_graph_ms`` is each
fast configuration's own GPU-bound time (its captured UNet call replayed back to back, no scheduler): biased
attention costs GPU time of its own, so ``ratio_to_config_unet_graph`` is what the serving loop adds on top.

    python benchmarks/denoise_speed.py --device cuda --json benchmarks/results/denoise_speed_h200.json
    python benchmarks/denoise_speed.py --tiny --json /tmp/denoise_speed_tiny.json        # CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import benchmark_report, device_name, write_report  # noqa: E402

from benchmarks.image_speed import SD15_UNET, SDXL_UNET, TINY, Runner, timer, unet_dtype  # noqa: E402
from benchmarks.video_speed import ADAPTER_V153, TINY_ADAPTER, TINY_UNET  # noqa: E402
from pipelines.diffusion.attention import AttentionControl  # noqa: E402
from pipelines.diffusion.compass import CompassObject, CompassPrompt, localisation_biases  # noqa: E402
from pipelines.diffusion.fast import FastUNet  # noqa: E402
from pipelines.diffusion.lpa import route_style_tokens  # noqa: E402
from pipelines.diffusion.merging import apply_merging, merging_stats, remove_merging  # noqa: E402

TEXT_TOKENS = 77
CONFIGS = ("plain", "merge", "lpa", "compass", "lpa+compass+merge")
# tomesd 0.1.3 on an H200, GPU-bound merged/vanilla (issue 4): what merging on the fast path must beat.
TOMESD_ANCHOR = {"sd15": {512: 1.05, 1024: 0.87, 2048: 0.60}, "sdxl": {2048: 0.92}}
# SD1.5 / AnimateDiff / SDXL betas (scaled linear). DDIM indexes its CPU table with the device timestep and
# compares it on the host, so it synchronises every step; Euler (SDXL's default) keeps its sigmas on the host.
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}
# What the app serves with its "default" scheduler: each model's own (SD1.5 PNDM, SDXL Euler; AnimateDiff DDIM).
ARCH_DEFAULT_SCHEDULER = {"sd15": "pndm", "sdxl": "euler", "animatediff": "ddim"}
SCHEDULER_OPTIONS = {"ddim": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                     "euler": dict(steps_offset=1), "pndm": dict(skip_prk_steps=True, set_alpha_to_one=False,
                                                                steps_offset=1)}
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_unet(arch: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """Random-weight UNet initialised on the device (fast even for SDXL's 2.6 B parameters)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    with torch.device(device):
        if arch == "animatediff":
            base = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
            unet = UNetMotionModel.from_unet2d(base, MotionAdapter(**(TINY_ADAPTER if tiny else ADAPTER_V153)))
        else:
            unet = UNet2DConditionModel(**(TINY[arch] if tiny else {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[arch]))
    return unet.to(device=device, dtype=dtype).eval()


def loop_inputs(unet, arch: str, size: int, frames: int, device, dtype) -> dict:
    """Initial latents (one image or video, CFG doubles it) and the text conditioning of the loop."""
    g = torch.Generator().manual_seed(size)
    side = size // 8
    shape = (1, 4, frames, side, side) if arch == "animatediff" else (1, 4, side, side)
    rows = 2 * frames if arch == "animatediff" else 2
    inputs = {"latents": torch.randn(*shape, generator=g).to(device, dtype),
              "encoder_hidden_states": torch.randn(rows, TEXT_TOKENS, unet.config.cross_attention_dim,
                                                   generator=g).to(device, dtype)}
    if unet.config.get("addition_embed_type") == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype, device=device)}
    return inputs


def make_control(unet, config: str) -> AttentionControl | None:
    """The config's attention controls, as the image tab sets them up (token positions of a typical prompt)."""
    control = AttentionControl(unet)
    if "lpa" in config:  # "a cat and a dog on a bench in watercolor style": content 2-9, style 11
        control.biases.extend(route_style_tokens(control.layers, [2, 3, 5, 6, 8, 9], [11]))
    if "compass" in config:
        objects = [CompassObject("cat", 90.0, (0.0, 0.3, 0.5, 0.9)), CompassObject("dog", 270.0, (0.5, 0.3, 1.0, 0.9))]
        control.biases.extend(localisation_biases(CompassPrompt("", [(2, 3), (5, 6)]), objects))
    return control if control.biases else None


def denoise(unet, scheduler, inputs: dict, steps: int, guidance: float, control, fast) -> torch.Tensor:
    """diffusers' loop body (CFG, scale, UNet, guidance, scheduler step) for ``steps`` steps."""
    scheduler.set_timesteps(steps, device=inputs["latents"].device)
    latents = inputs["latents"] * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(model_input, t, encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs=inputs.get("added_cond_kwargs"), return_dict=False)[0]
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, return_dict=False)[0]
        if control is not None:
            control.step = i + 1
        if fast is not None:
            fast.step = i + 1
    return latents


class Case:
    """One configuration in one mode (``eager``: the stock call; ``fast-<backend>``: through ``FastUNet``);
    ``run()`` is one timed loop."""

    def __init__(self, unet, arch: str, config: str, mode: str, inputs: dict, args) -> None:
        import diffusers

        self.unet, self.config, self.mode, self.inputs, self.args = unet, config, mode, inputs, args
        self.name = f"{config} {mode}"
        name = ARCH_DEFAULT_SCHEDULER[arch] if args.scheduler == "default" else args.scheduler
        self.scheduler = getattr(diffusers, SCHEDULERS[name])(**BETAS, **SCHEDULER_OPTIONS[name])
        self.capture_s = 0.0
        self.merged = 0

    def run(self, unet_only: bool = False) -> torch.Tensor:
        """One loop; ``unet_only``: the same number of UNet calls back to back on the first step's inputs (no
        scheduler, no host sync): this configuration's GPU-bound time."""
        unet, args = self.unet, self.args
        control = make_control(unet, self.config)
        with ExitStack() as stack:
            if "merge" in self.config:
                apply_merging(unet, 0.5, seed=0, min_tokens=args.min_tokens)
                stack.callback(remove_merging, unet)
            if control is not None:
                stack.enter_context(control)
            fast = None
            if self.mode != "eager":
                backend = self.mode.removeprefix("fast-")
                fast = stack.enter_context(FastUNet(unet, backend, control, lambda: self.scheduler.timesteps))
            if unet_only:
                out = repeat_first_call(unet, self.scheduler, self.inputs, args.steps)
            else:
                out = denoise(unet, self.scheduler, self.inputs, args.steps, 7.5, control, fast)
            self.merged = merging_stats(unet)["tokens_merged_per_call"]
        if fast is not None:
            self.capture_s += fast.capture_s
        return out


def repeat_first_call(unet, scheduler, inputs: dict, steps: int) -> torch.Tensor:
    """As many UNet calls as a loop makes, all with the first step's inputs and nothing in between (the
    control's step stays 0)."""
    scheduler.set_timesteps(steps, device=inputs["latents"].device)
    t = scheduler.timesteps[0]
    model_input = scheduler.scale_model_input(torch.cat([inputs["latents"] * scheduler.init_noise_sigma] * 2), t)
    for _ in range(len(scheduler.timesteps)):
        noise = unet(model_input, t, encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs=inputs.get("added_cond_kwargs"), return_dict=False)[0]
    return noise


def anchor_runner(unet, inputs: dict, device) -> Runner | None:
    """The plain UNet call captured once (CUDA only): replayed back to back it is the GPU-bound time."""
    if device.type != "cuda":
        return None
    latents = inputs["latents"]
    call = {"sample": torch.cat([latents] * 2), "timestep": torch.tensor(500.0, device=device),
            "encoder_hidden_states": inputs["encoder_hidden_states"]}
    if "added_cond_kwargs" in inputs:
        call["added_cond_kwargs"] = inputs["added_cond_kwargs"]
    return Runner(unet, call, graph=True)


def unet_calls(case: "Case", steps: int) -> int:
    """UNet calls in one loop of ``steps`` steps (PNDM without PRK steps repeats its second timestep)."""
    case.scheduler.set_timesteps(steps)
    return len(case.scheduler.timesteps)


def count_syncs(case: "Case") -> int:
    """Host synchronisations during one loop (``torch.cuda.set_sync_debug_mode``): each one drains the GPU's
    queue, so the host work after it (scheduler, input copies, graph launch) is no longer hidden."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            case.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def measure(arch: str, size: int, args, device, dtype) -> list[dict]:
    unet = build_unet(arch, args.tiny, device, dtype)
    inputs = loop_inputs(unet, arch, size, args.frames, device, dtype)
    anchor = anchor_runner(unet, inputs, device)
    modes = ["eager", *(f"fast-{b}" for b in args.backends)]
    cases = [Case(unet, arch, config, mode, inputs, args) for config in args.configs for mode in modes]
    calls = unet_calls(cases[0], args.steps)
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    anchor_times: list[float] = []
    clock = timer(device)
    for repeat in range(args.warmup + args.repeats):
        shift = repeat % len(cases)
        if anchor is not None:  # timed in the same rotation, so device state (clocks, caches) is shared
            elapsed = clock(lambda: [anchor() for _ in range(calls)])
            if repeat >= args.warmup:
                anchor_times.append(elapsed / calls)
        for case in cases[shift:] + cases[:shift]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            try:
                elapsed = clock(lambda: outputs.__setitem__(case.name, case.run().float()))
            except Exception as error:  # a backend that fails (e.g. compile) is reported, not fatal
                outputs[case.name] = None
                case.error = f"{type(error).__name__}: {error}"[:300]
                continue
            if repeat >= args.warmup:
                times[case.name].append(elapsed / calls)
    graph_ms = statistics.median(anchor_times) if anchor_times else None
    del anchor
    syncs = {case.name: count_syncs(case) for case in cases} if args.count_syncs and device.type == "cuda" else {}
    bound: dict[str, float] = {}
    if device.type == "cuda" or args.tiny:  # each fast configuration's own bound: graphs captured above
        for case in cases:
            if case.mode != "eager" and not getattr(case, "error", None):
                samples = [clock(lambda: case.run(unet_only=True)) / calls for _ in range(max(args.repeats, 3))]
                bound[case.name] = statistics.median(samples)
    rows = []
    plain_fast = {mode: statistics.median(times[f"plain {mode}"]) for mode in modes[1:] if times.get(f"plain {mode}")}
    for case in cases:
        row = {"method": case.name, "arch": arch, "size": size, "config": case.config, "mode": case.mode,
               "frames": args.frames if arch == "animatediff" else 1, "batch": 2, "steps": args.steps,
               "unet_calls": calls}
        if getattr(case, "error", None):
            rows.append({**row, "error": case.error})
            print(json.dumps(rows[-1]), flush=True)
            continue
        ms = statistics.median(times[case.name])
        eager = outputs[f"{case.config} eager"]
        row.update(ms_per_unet_call=round(ms, 3), ms_min=round(min(times[case.name]), 3),
                   speedup_vs_eager=round(statistics.median(times[f"{case.config} eager"]) / ms, 3),
                   tokens_merged_per_call=case.merged)
        if case.name in syncs:
            row["host_syncs_per_loop"] = syncs[case.name]
        if graph_ms is not None:
            row["unet_graph_ms"] = round(graph_ms, 3)
            row["ratio_to_unet_graph"] = round(ms / graph_ms, 3)
        if case.name in bound:
            row["config_unet_graph_ms"] = round(bound[case.name], 3)
            row["ratio_to_config_unet_graph"] = round(ms / bound[case.name], 3)
        if case.mode != "eager":
            row["capture_s"] = round(case.capture_s, 3)
            row["max_abs_diff_vs_eager"] = float((outputs[case.name] - eager).abs().max())
            if "merge" in case.config and case.mode in plain_fast:
                row["ratio_to_plain_same_mode"] = round(ms / plain_fast[case.mode], 3)
                anchor = TOMESD_ANCHOR.get(arch, {}).get(size)
                if anchor is not None and case.config == "merge":
                    row["tomesd_anchor_ratio"] = anchor
        rows.append(row)
        print(json.dumps(row), flush=True)
    del cases, unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--runs", default="sd15:512,sd15:1024,sd15:2048,sdxl:1024,sdxl:2048,sdxl:512,animatediff:512",
                        help="comma-separated arch:size (arch: sd15, sdxl, animatediff)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--backends", default=None,
                        help="fast-path backends to time besides eager: graph, compile (default: graph on CUDA, "
                             "eager on CPU, where it is the static path with capture disabled)")
    parser.add_argument("--frames", type=int, default=16, help="AnimateDiff frames")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (the fast path captures here)")
    parser.add_argument("--min-tokens", type=int, default=None, help="merging threshold (default: the app's)")
    parser.add_argument("--scheduler", default="ddim", choices=["default", *sorted(SCHEDULERS)],
                        help="default: each architecture's own (what the app serves), see ARCH_DEFAULT_SCHEDULER")
    parser.add_argument("--count-syncs", action="store_true",
                        help="CUDA: after timing, run each case once more counting host synchronisations")
    parser.add_argument("--tiny", action="store_true", help="tiny channels, same block layout (CPU check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = unet_dtype(args.dtype, device)
    args.backends = (args.backends or ("graph" if device.type == "cuda" else "eager")).split(",")
    args.configs = args.configs.split(",")
    if args.min_tokens is None:
        from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS

        args.min_tokens = 0 if args.tiny else DEFAULT_MIN_TOKENS
    started = time.perf_counter()
    rows = []
    for run in args.runs.split(","):
        arch, size = run.split(":")
        rows += measure(arch, int(size), args, device, dtype)
    report = benchmark_report(
        "denoise_speed", device_name(device),
        "SD1.5 / SDXL UNet2DConditionModel and AnimateDiff UNetMotionModel (v1-5-3), random weights"
        + (" (tiny channels)" if args.tiny else ""),
        {"dtype": str(dtype).removeprefix("torch."), "batch": "2 (CFG)", "text_tokens": TEXT_TOKENS,
         "steps_per_loop": args.steps, "repeats": args.repeats, "warmup": args.warmup,
         "backends": args.backends, "configs": args.configs, "frames": args.frames,
         "merge": f"r=0.5, min_tokens={args.min_tokens}",
         "scheduler": args.scheduler if args.scheduler != "default" else ARCH_DEFAULT_SCHEDULER,
         "torch": torch.__version__, "wall_s": round(time.perf_counter() - started, 1),
         "timing": "median ms per served step (CUDA events around the loop on GPU); configurations "
                   "and modes interleaved in rotating order",
         "tomesd_anchor": TOMESD_ANCHOR},
        rows, argv)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
