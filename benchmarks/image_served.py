"""The image and video tabs as served: ``ImagePipeline.generate`` / ``VideoPipeline.generate`` vs the stock
diffusers pipeline called directly, same process, interleaved, after warm-up, median of repeats.

Random weights of the real SD1.5 / SDXL / AnimateDiff configs (speed does not depend on the values) are saved
once to local folders and loaded the way the app loads a local model: through the ModelStore, in the dtype it
picks (bf16 on an H200). The stock anchor is a second copy loaded with diffusers' own ``from_pretrained`` and
called as its docs show (prompt string, CUDA generator, PIL output). Ours includes everything a user waits for:
prompt parsing, controls, previews, PNG/MP4 writing with parameters.

Rows: ``seconds`` (wall per output), ``ratio_vs_stock``, ``ratio_vs_plain`` (the tab with no controls), (binding)
the refinement's UNet forwards/backwards per image and the last call's graph replays, (ours) the
``graph_cache_misses`` of every call, warm-up first (a miss in a timed call is a capture timed with it), and
``peak_memory_gb`` = the pipeline's weights + the largest allocation above them during a timed call + (ours) the
CUDA-graph pool the warm-up reserved for that configuration.

    python benchmarks/image_served.py --cases sd15:512,sd15:1024,sdxl:1024,video:512 \
        --json benchmarks/results/image_served_h200.json
    python benchmarks/image_served.py --tiny --cases sd15:32,sdxl:32,video:32 --steps 3 --repeats 1 --json /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_speed import SD15_UNET, SDXL_UNET  # noqa: E402
from benchmarks.report import command_line, sync, write_report  # noqa: E402
from pipelines.settings import fast_backend  # noqa: E402
from pipelines.tabs.image import ImagePipeline, ImageRequest  # noqa: E402
from pipelines.models import ModelSpec, ModelStore, module_nbytes  # noqa: E402
from pipelines.diffusion.animatediff import animatediff_scheduler  # noqa: E402
from pipelines.tabs.video import VideoPipeline, VideoRequest  # noqa: E402

PROMPT = "a [red hat] and a [blue car] in watercolor style"
COMPASS = json.dumps([{"name": "hat", "angle": 0, "box": [0.0, 0.0, 0.5, 1.0]},
                      {"name": "car", "angle": 90, "box": [0.5, 0.0, 1.0, 1.0]}])
IMAGE_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "fast_off": dict(fast=False),
    "merge": dict(merge_ratio=0.5),
    "lpa": dict(lpa=True),
    "compass": dict(compass=COMPASS),
    "leakfix": dict(isolate="red hat"),
    "binding": dict(binding=True),
    "lpa+compass+merge": dict(lpa=True, compass=COMPASS, merge_ratio=0.5),
}
# Per binding row: UNet passes of the refinement per image and the captured refinement's replays (stats of a call).
PASS_FIELDS = ("binding_unet_forwards", "binding_unet_backwards", "graph_replays", "capture_s")
VIDEO_CONFIGS: dict[str, dict[str, Any]] = {"plain": {}, "fast_off": dict(fast=False), "merge": dict(merge_ratio=0.5),
                                            "lpa": dict(lpa=True)}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  projection_dim=1280, hidden_act="gelu")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)


# ---- random full-size models, saved like a downloaded snapshot ------------------------------------------
def text_encoder(settings: dict[str, Any], projection: bool, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def random_pipeline(arch: str) -> Any:
    """SD1.5 or SDXL with the real configs and random weights (built on the GPU when there is one)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from pipelines.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if arch == "sd15":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE, sample_size=512), text_encoder=text_encoder(CLIP_L, False, tokenizer),
            tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=PNDMScheduler(**betas, skip_prk_steps=True), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder(CLIP_L, False, tokenizer), text_encoder_2=text_encoder(CLIP_BIG_G, True, tokenizer_2),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler(**betas, timestep_spacing="leading"), add_watermarker=False)


def tiny_pipeline(arch: str) -> Any:
    from pipelines.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    return tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()


def motion_adapter(tiny: bool) -> Any:
    """AnimateDiff v1-5-3's adapter config (no mid-block motion module), random weights."""
    from diffusers import MotionAdapter

    if tiny:
        return MotionAdapter(block_out_channels=(8, 16, 16, 16), motion_layers_per_block=1,
                             motion_num_attention_heads=2, motion_norm_num_groups=4, motion_max_seq_length=32,
                             use_motion_mid_block=False)
    return MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                         motion_max_seq_length=32, use_motion_mid_block=False)


def saved_models(root: Path, arch: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Folders of random models (built once per root): ``{"sd15": path}``, ``{"sdxl": ...}`` or the video pair."""
    base = arch if arch != "video" else "sd15"
    folder = root / f"{'tiny-' if tiny else ''}{base}"
    if not folder.is_dir():
        with torch.device(device):
            pipe = tiny_pipeline(base) if tiny else random_pipeline(base)
        pipe.to(dtype=dtype).save_pretrained(folder)
        del pipe
    if arch != "video":
        return {arch: str(folder)}
    adapter = root / f"{'tiny-' if tiny else ''}motion-adapter"
    if not adapter.is_dir():
        with torch.device(device):
            motion_adapter(tiny).to(dtype=dtype).save_pretrained(adapter)
    return {"base": str(folder), "adapter": str(adapter)}


# ---- timing ---------------------------------------------------------------------------------------------
def timed(call: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall seconds of ``call`` and the largest allocation above what was allocated before it (GB)."""
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    sync(device)
    seconds = time.perf_counter() - start
    above = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
    return seconds, above / 1e9


def reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def measure(calls: dict[str, Callable[[], Any]], weights: dict[str, float], repeats: int,
            device: torch.device) -> dict[str, dict[str, float]]:
    """Warm every call once (graph capture, compile), then time them in rotating order."""
    pools: dict[str, float] = {}
    for name, call in calls.items():
        grown = reserved(device)
        call()
        sync(device)
        pools[name] = max(reserved(device) - grown, 0) / 1e9 if name not in ("stock", "fast_off") else 0.0
        print(f"  warmed {name}", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, float] = {name: 0.0 for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            elapsed, above = timed(calls[name], device)
            seconds[name].append(elapsed)
            peaks[name] = max(peaks[name], above)
    return {name: {"seconds": statistics.median(seconds[name]), "all_seconds": [round(s, 4) for s in seconds[name]],
                   "peak_memory_gb": round(weights[name] + peaks[name] + pools[name], 3)} for name in calls}


def image_case(arch: str, size: int, folder: str, configs: list[str], args: argparse.Namespace,
               store: ModelStore) -> list[dict[str, Any]]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    served = ImagePipeline(store)
    ours_weights = module_nbytes(served.load(folder).pipe) / 1e9
    stock_cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    stock = stock_cls.from_pretrained(folder, torch_dtype=store.dtype).to(store.device)
    stock.set_progress_bar_config(disable=True)
    device = store.device

    passes: dict[str, dict[str, int]] = {}
    misses: dict[str, list[int]] = {}  # per call, warm-up first: a miss after warm-up is a capture in a timed call

    def ours(settings: dict[str, Any]) -> Callable[[], Any]:
        def call() -> None:
            stats = served.run(ImageRequest(prompt=PROMPT, model=folder, steps=args.steps, width=size, height=size,
                                            seed=1, **settings)).stats
            misses.setdefault(str(settings), []).append(stats.get("graph_cache_misses"))
            if "binding_unet_forwards" in stats:  # the hardware-independent figure of binding's cost
                passes[str(settings)] = {key: stats[key] for key in PASS_FIELDS}
        return call

    def direct() -> Any:
        generator = torch.Generator(device).manual_seed(1)
        return stock(PROMPT.replace("[", "").replace("]", ""), num_inference_steps=args.steps, guidance_scale=7.5,
                     height=size, width=size, generator=generator).images

    calls = {"stock": direct, **{name: ours(IMAGE_CONFIGS[name]) for name in configs}}
    measured = compare(arch, size, calls, ours_weights, module_nbytes(stock) / 1e9, args, store)
    for row in measured:
        settings = str(IMAGE_CONFIGS.get(row["config"]))
        row.update(passes.get(settings, {}))
        if settings in misses:
            row["graph_cache_misses"] = misses[settings]
    return measured


def video_pipelines(folders: dict[str, str], store: ModelStore) -> tuple[VideoPipeline, str, Any]:
    """The video tab serving the saved random AnimateDiff (loaded), its model name, and the same weights as a stock
    ``AnimateDiffPipeline`` with the tab's scheduler."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    served = VideoPipeline(store)
    served.specs = [ModelSpec("AnimateDiff (random weights)", "animatediff", hub_id=folders["adapter"],
                              options=(("base", folders["base"]),))]
    name = served.specs[0].name
    served.load(name)
    adapter = MotionAdapter.from_pretrained(folders["adapter"], torch_dtype=store.dtype)
    stock = AnimateDiffPipeline.from_pretrained(folders["base"], motion_adapter=adapter, torch_dtype=store.dtype)
    stock.scheduler = animatediff_scheduler(folders["base"])
    stock = stock.to(store.device)
    stock.set_progress_bar_config(disable=True)
    return served, name, stock


def video_case(size: int, folders: dict[str, str], configs: list[str], args: argparse.Namespace,
               store: ModelStore) -> list[dict[str, Any]]:
    served, name, stock = video_pipelines(folders, store)
    ours_weights = module_nbytes(served.load(name)) / 1e9
    device = store.device
    frames = args.frames

    def ours(settings: dict[str, Any]) -> Callable[[], Any]:
        return lambda: served.run(VideoRequest(prompt=PROMPT, model=name, steps=args.video_steps, width=size,
                                               height=size,
                                               num_frames=frames, context_length=min(16, frames), seed=1, **settings))

    def direct() -> Any:
        generator = torch.Generator(device).manual_seed(1)
        return stock(PROMPT.replace("[", "").replace("]", ""), num_frames=frames, num_inference_steps=args.video_steps,
                     guidance_scale=7.5, height=size, width=size, generator=generator).frames

    calls = {"stock": direct, **{config: ours(VIDEO_CONFIGS[config]) for config in configs}}
    return compare("animatediff", size, calls, ours_weights, module_nbytes(stock) / 1e9, args, store)


def compare(arch: str, size: int, calls: dict[str, Callable[[], Any]], ours_gb: float, stock_gb: float,
            args: argparse.Namespace, store: ModelStore) -> list[dict[str, Any]]:
    """Time the tab's configurations against the stock call, then free both pipelines for the next case."""
    weights = {name: ours_gb for name in calls}
    weights["stock"] = stock_gb
    results = measure(calls, weights, args.repeats, store.device)
    store.unload_all()
    return rows(arch, size, results)


def rows(arch: str, size: int, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    stock, plain = results["stock"]["seconds"], results.get("plain", {}).get("seconds")
    out = []
    for config, result in results.items():
        row = {"arch": arch, "size": size, "config": config, "seconds": round(result["seconds"], 4),
               "ratio_vs_stock": round(result["seconds"] / stock, 4),
               "ratio_vs_plain": round(result["seconds"] / plain, 4) if plain else None,
               "peak_memory_gb": result["peak_memory_gb"], "all_seconds": result["all_seconds"]}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="sd15:512,sd15:1024,sdxl:1024,video:512",
                        help="arch:size[:config+config],... with arch in sd15, sdxl, video (configs: --configs)")
    parser.add_argument("--configs", default=",".join(IMAGE_CONFIGS),
                        help="image configs (video runs the ones of these it supports)")
    parser.add_argument("--steps", type=int, default=30, help="image steps (the tab's default)")
    parser.add_argument("--video-steps", type=int, default=25, help="video steps (the tab's default)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a quick check of the script")
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "tokenworks-bench-models"))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    store = ModelStore(packaged={})
    configs = args.configs.split(",")
    all_rows: list[dict[str, Any]] = []
    report = {"benchmark": "image_served", "device": torch.cuda.get_device_name() if store.device.type == "cuda"
              else "cpu", "model": "random weights of the real SD1.5 / SDXL / AnimateDiff v1-5-3 configs"
              if not args.tiny else "tiny random models", "dtype": str(store.dtype),
              "settings": {"steps": args.steps, "video_steps": args.video_steps, "repeats": args.repeats,
                           "frames": args.frames, "prompt": PROMPT,
                           "configs": {**IMAGE_CONFIGS, **{f"video:{k}": v for k, v in VIDEO_CONFIGS.items()}},
                           "fast_backend": fast_backend(), "command": command_line(argv)},
              "rows": all_rows}
    for case in args.cases.split(","):
        arch, size, *only = case.split(":")
        chosen = only[0].split("+") if only else configs
        print(f"{arch} {size}px: {', '.join(chosen)}", flush=True)
        folders = saved_models(Path(args.models), arch, args.tiny, store.device, store.dtype)
        if arch == "video":
            all_rows += video_case(int(size), folders, [c for c in chosen if c in VIDEO_CONFIGS], args, store)
        else:
            all_rows += image_case(arch, int(size), folders[arch], chosen, args, store)
        write_report(report, args.json)  # after each case, so a run cut short keeps what it measured
    return report


if __name__ == "__main__":
    main()
