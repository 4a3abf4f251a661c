"""Train micro-world v2 on freshly rendered scenes, stage by stage, within a wall-clock budget; resumable.

    # one accelerator call (10 minutes): every stage, everything in one folder, packed for the trip back
    python -m pipelines.microworld.train_v2 --stages clip,vae,unet --minutes 8.5 \
        --out outputs/microworld_v2 --pack "$OUT"
    # a later call (same folder) or session (the folder unpacked and carried): continue the UNet, then train
    # the compass encoder, from the saved weights alone
    python -m pipelines.microworld.train_v2 --stages unet,compass --minutes 9 \
        --resume outputs/microworld_v2 --out outputs/microworld_v2 --pack "$OUT"
    # micro-world v3: v2's UNet continued on the word-token readout, its compass encoder retrained on that UNet
    python -m pipelines.microworld.train_v2 --resume pipelines/microworld/weights_v2 --stages unet,compass \
        --text-readout words --minutes 9 --out outputs/microworld_v3 --pack "$OUT"
    # back home: cat microworld_v2.tar.part* | tar -x -C outputs/

Stages (each saves the folder when it ends, so a killed call keeps what finished):
- ``clip``: a small CLIP (``text_v2``) trained contrastively on scene/caption pairs, each scene that names an
  arrow's heading also scored against its caption with the arrows turned (a tower trained without these hard
  negatives gave "pointing left" and "pointing right" end-token states at cosine 0.99), and a linear probe reading
  the named directions from the sentence embedding (``text_v2.heading_probe``: hard negatives alone left the
  heading at chance on a CPU run; logged as ``text_heading``, image-side as ``heading``); its text tower is kept,
  frozen, as the pipeline's ``CLIPTextModel``. ``--new-text-encoder`` replaces a resumed folder's tower and
  continues its UNet on the new one.
- ``vae``: an ``AutoencoderKL`` at f=4 (128 px -> 32x32x4), L1 + MSE + a tiny KL; then the latent scale
  (1/std of the latents, as SD's 0.18215 was measured).
- ``unet``: a ``UNet2DConditionModel`` (SD1.5 layout, cross-attention at 32/16/8) with SD1.5's noise schedule,
  epsilon prediction, min-SNR-5 loss weights, 10 % empty captions for guidance, EMA weights saved.
  ``--text-readout words`` trains it on the word tokens only (``word_readout``: every state from the first end
  token on is zero), micro-world v3; the saved ``model_index.json`` then names ``WordReadoutCLIPTextModel``, and a
  run resumed from that folder keeps its readout unless told otherwise. Each log line reports how much the UNet uses
  the caption, which its MSE cannot tell (``text_gap``).
- ``compass``: a Compass Control angle encoder for the frozen model (``compass_v2``).
Resuming restarts AdamW (with a short warm-up) from the saved weights alone: optimiser state would double what
has to travel between sessions. Data is rendered on the device each step (``scenes_v2``), seeded by
(seed, stage, step), so runs are reproducible and a resumed run sees new scenes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tarfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes_v2, text_v2
from .word_readout import READOUTS, folder_readout, readout_class, with_readout

SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

STAGES = ("clip", "vae", "unet", "compass")
MAX_SHARD = "14MB"  # every weight file under the 15 MiB a file may have on its way back from the device
PART_BYTES = 15 * 2**20


@dataclass
class TrainConfig:
    out: str = "outputs/microworld_v2"
    resume: str = ""  # a folder saved by this script: its weights are loaded, its step counts continued
    stages: str = "clip,vae,unet"
    minutes: float = 9.0  # the whole run; ``unet`` gets what the other stages and the reserve leave
    clip_minutes: float = 1.5
    vae_minutes: float = 1.5
    compass_minutes: float = 1.0
    reserve_minutes: float = 0.5  # saving, samples and packing after the last stage
    max_steps: int = 0  # per stage (0 = until its time is up): smoke runs and tests
    device: str = "cuda"
    dtype: str = "bf16"  # autocast on CUDA: bf16 | fp32
    compile: bool = False  # torch.compile the UNet (worth it for runs of many minutes)
    size: int = 128
    text_width: int = 256
    text_layers: int = 3
    vision_layers: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)  # three levels: f = 4
    unet_channels: tuple[int, ...] = (64, 128, 144, 144)  # 15.5 M: attention at 32, 16, 8; a plain level at 4
    layers_per_block: int = 2
    head_dim: int = 32
    norm_groups: int = 16
    clip_batch: int = 512
    vae_batch: int = 64
    unet_batch: int = 256
    compass_batch: int = 64
    clip_lr: float = 5e-4
    vae_lr: float = 5e-4
    unet_lr: float = 2e-4
    compass_lr: float = 1e-3
    warmup: int = 300  # steps, fresh weights
    resume_warmup: int = 100  # steps, fresh AdamW on resumed weights
    kl_weight: float = 1e-6
    uncond: float = 0.1
    ema: float = 0.999
    min_snr: float = 5.0
    log_every: int = 50
    probe_scenes: int = 64  # held-out scenes whose text gap (``text_gap``) every UNet log line reports (0: off)
    seed: int = 0
    samples: bool = True
    new_text_encoder: bool = False  # with --resume and the clip stage: train a new text tower; the UNet goes on
    # what the UNet reads of the text encoder: all (every position, v2) | words (zero from the first end token on,
    # v3: word_readout); "" = the resumed folder's, else all
    text_readout: str = ""
    pack: str = ""  # also write the folder as a split tar (parts <= 15 MiB), report and samples here
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Models:
    tokenizer: Any = None
    text_encoder: Any = None
    vae: Any = None
    unet: Any = None
    compass: Any = None
    steps: dict[str, int] = field(default_factory=lambda: {stage: 0 for stage in STAGES})


def log(config: TrainConfig, row: dict[str, Any]) -> None:
    """Print a JSON line at once (the device only shows the tail) and keep it for the report."""
    config.history.append(row)
    print(json.dumps(row), flush=True)


class Budget:
    """A stage's wall-clock allowance (``minutes`` <= 0: no limit)."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + minutes * 60 if minutes > 0 else math.inf

    def left(self) -> bool:
        return time.monotonic() < self.deadline


def parse_config(cls: type, argv: list[str] | None, description: str) -> Any:
    """A dataclass config from the command line: one flag per field (tuples comma-separated, bools --x/--no-x)."""
    parser = argparse.ArgumentParser(description=description)
    for name, value in asdict(cls()).items():
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


def autocast(config: TrainConfig, device: torch.device) -> Any:
    enabled = device.type == "cuda" and config.dtype == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def optimiser(params: Any, lr: float, warmup: int, weight_decay: float = 1e-2) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return optimizer, schedule


def descend(optimizer: Any, schedule: Any, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


class Batches:
    """Scenes and token ids for the coming steps, drawn on CPU threads while the device works (numpy and the
    tokenizer release the GIL for most of it): ``ahead`` batches in flight, in step order."""

    def __init__(self, make: Callable[[int], Any], first: int, ahead: int = 4) -> None:
        self.make, self.pool = make, ThreadPoolExecutor(ahead)
        self.queue = deque(self.pool.submit(make, first + i) for i in range(ahead))
        self.upcoming = first + ahead

    def __call__(self) -> Any:
        batch = self.queue.popleft().result()
        self.queue.append(self.pool.submit(self.make, self.upcoming))
        self.upcoming += 1
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


THREAD = threading.local()


def thread_tokenizer(tokenizer: Any) -> Any:
    """This thread's own copy of ``tokenizer``: a fast tokenizer shared by threads fails ("Already borrowed")."""
    if getattr(THREAD, "source", None) is not tokenizer:
        THREAD.source, THREAD.copy = tokenizer, copy.deepcopy(tokenizer)
    return THREAD.copy


def captioned(config: TrainConfig, tokenizer: Any, stage: str, step: int, batch: int,
              uncond: float = 0.0) -> tuple[Any, torch.Tensor]:
    """(layouts, caption token ids) for one step: seeded by (seed, stage, step); ``uncond`` of the captions empty."""
    seed = (config.seed, STAGES.index(stage), step)
    layouts = scenes_v2.sample_layouts(batch, seed, config.size)
    rng = np.random.default_rng((*seed, 1))
    captions = ["" if rng.random() < uncond else scenes_v2.caption(layouts, i, rng) for i in range(batch)]
    return layouts, text_v2.tokenize(thread_tokenizer(tokenizer), captions)


def clip_batch(config: TrainConfig, tokenizer: Any, step: int, batch: int
               ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layouts, caption ids, ids of the same captions with the arrows turned, where those two differ, the
    directions each of those texts names): the contrastive stage's batch with one hard negative per scene that
    names a heading."""
    seed = (config.seed, STAGES.index("clip"), step)
    layouts = scenes_v2.sample_layouts(batch, seed, config.size)
    turned = scenes_v2.turned_headings(layouts, np.random.default_rng((*seed, 2)))
    rng = np.random.default_rng((*seed, 1))
    captions, negatives = [], []
    for i in range(batch):
        twin = copy.deepcopy(rng)  # the same template and choices, only the headings differ
        captions.append(scenes_v2.caption(layouts, i, rng))
        negatives.append(scenes_v2.caption(turned, i, twin))
    tokenizer = thread_tokenizer(tokenizer)
    differs = torch.tensor([a != b for a, b in zip(captions, negatives)])
    headings = text_v2.named_headings(captions + negatives)
    return layouts, text_v2.tokenize(tokenizer, captions), text_v2.tokenize(tokenizer, negatives), differs, headings


def stage_steps(config: TrainConfig, budget: Budget) -> Iterator[int]:
    """1, 2, ... until the stage's time is up (or ``max_steps``)."""
    step = 0
    while budget.left() and (config.max_steps <= 0 or step < config.max_steps):
        step += 1
        yield step


def train_clip(models: Models, config: TrainConfig, device: torch.device, budget: Budget) -> None:
    clip = text_v2.build_clip(models.tokenizer, config.text_width, config.text_layers, config.vision_layers,
                              config.size, config.seed).to(device).train()
    probe = text_v2.heading_probe(clip).to(device)
    parameters = [*clip.parameters(), *probe.parameters()]
    optimizer, schedule = optimiser(parameters, config.clip_lr, config.warmup, weight_decay=0.1)
    batches = Batches(lambda s: clip_batch(config, models.tokenizer, s, config.clip_batch), 1)
    start, running = time.monotonic(), []
    for step in stage_steps(config, budget):
        layouts, ids, turned, differs, headings = (part.to(device) if torch.is_tensor(part) else part
                                                   for part in batches())
        images, _ = scenes_v2.render_layouts(layouts, device)
        with autocast(config, device):
            loss = text_v2.contrastive_loss(clip, ids, images, turned, differs, probe, headings)
        descend(optimizer, schedule, loss, parameters)
        running.append(loss.detach())
        if step % config.log_every == 0:
            with autocast(config, device):
                accuracy = text_v2.retrieval_accuracy(clip, ids, images)
                heading = text_v2.heading_accuracy(clip, ids, images, turned, differs)
                read = text_v2.probe_accuracy(clip, probe, ids, headings[: len(ids)])
            log(config, {"stage": "clip", "step": step, "loss": round(torch.stack(running).mean().item(), 4),
                         "retrieval": round(accuracy, 3), "heading": round(heading, 3), "text_heading": round(read, 3),
                         "minutes": round((time.monotonic() - start) / 60, 2)})
            running = []
        models.steps["clip"] = step
    batches.close()
    models.text_encoder = with_readout(text_v2.text_encoder_of(clip.float().cpu()), config.text_readout).to(device)


def build_vae(config: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                         norm_num_groups=config.norm_groups, sample_size=config.size)


def train_vae(models: Models, config: TrainConfig, device: torch.device, budget: Budget) -> None:
    torch.manual_seed(config.seed)
    vae = build_vae(config).to(device).train()
    optimizer, schedule = optimiser(vae.parameters(), config.vae_lr, config.warmup, weight_decay=0.0)
    batches = Batches(lambda s: scenes_v2.sample_layouts(config.vae_batch, (config.seed, 1, s), config.size), 1)
    start, running = time.monotonic(), []
    for step in stage_steps(config, budget):
        x = scenes_v2.render_layouts(batches(), device)[0] * 2 - 1
        with autocast(config, device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.kl_weight * kl
        descend(optimizer, schedule, loss, list(vae.parameters()))
        running.append(loss.detach())
        if step % config.log_every == 0:
            log(config, {"stage": "vae", "step": step, "loss": round(torch.stack(running).mean().item(), 5),
                         "kl": round(kl.item(), 2), "minutes": round((time.monotonic() - start) / 60, 2)})
            running = []
        models.steps["vae"] = step
    batches.close()
    models.vae = vae.eval()
    scale = latent_scale(vae, config, device)
    vae.register_to_config(scaling_factor=scale)
    log(config, {"stage": "vae", "scaling_factor": round(scale, 5)})


@torch.no_grad()
def latent_scale(vae: Any, config: TrainConfig, device: torch.device, batches: int = 8) -> float:
    """1 / std of the latents of fresh scenes (how SD's 0.18215 was chosen)."""
    latents = []
    for index in range(batches):
        layouts = scenes_v2.sample_layouts(max(8, config.vae_batch), (config.seed, 9, index), config.size)
        with autocast(config, device):
            latents.append(vae.encode(scenes_v2.render_layouts(layouts, device)[0] * 2 - 1).latent_dist.sample()
                           .float())
    return float(1.0 / torch.cat(latents).std())


def build_unet(config: TrainConfig, context_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    latent = config.size // 2 ** (len(config.vae_channels) - 1)
    cross = len(config.unet_channels) - 1
    heads = tuple(max(1, c // config.head_dim) for c in config.unet_channels)  # diffusers' name for head count
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block, down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross, cross_attention_dim=context_dim,
        attention_head_dim=heads, norm_num_groups=config.norm_groups)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR per sample."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


@torch.no_grad()
def latents_of(models: Models, images: torch.Tensor, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """Scaled VAE latents (a posterior sample) of [0, 1] images."""
    with autocast(config, device):
        latents = models.vae.encode(images * 2 - 1).latent_dist.sample().float()
    return latents * models.vae.config.scaling_factor


@torch.no_grad()
def conditioning(models: Models, ids: torch.Tensor, layouts: Any, config: TrainConfig,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents of freshly rendered scenes, the frozen encoder's token states of their captions)."""
    latents = latents_of(models, scenes_v2.render_layouts(layouts, device)[0], config, device)
    with autocast(config, device):
        context = models.text_encoder(ids.to(device))[0].float()
    return latents, context


def diffused(alphas: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process: ``x0`` (any rank, one timestep per first-axis row) noised with ``noise`` at ``t``."""
    scale = alphas[t].view(-1, *[1] * (x0.dim() - 1))
    return scale.sqrt() * x0 + (1 - scale).sqrt() * noise


def noised(alphas: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, the noise, timesteps) at uniformly drawn timesteps of the DDPM forward process."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, len(alphas), (len(x0),), device=x0.device)
    return diffused(alphas, x0, noise, t), noise, t


@dataclass
class TextProbe:
    """Held-out scenes noised once, with their own captions' token states and with a neighbour's (rolled by one)."""
    noisy: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    rolled: torch.Tensor


def make_text_probe(models: Models, config: TrainConfig, device: torch.device, alphas: torch.Tensor) -> TextProbe:
    """``probe_scenes`` scenes from a seed no training step uses, at timesteps spread over 100..900 (where layout and
    colour are still being decided), one fixed noise draw."""
    seed = (config.seed, len(STAGES))
    layouts = scenes_v2.sample_layouts(config.probe_scenes, seed, config.size)
    rng = np.random.default_rng((*seed, 1))
    captions = [scenes_v2.caption(layouts, i, rng) for i in range(config.probe_scenes)]
    ids = text_v2.tokenize(thread_tokenizer(models.tokenizer), captions)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # the VAE's posterior sample: the same probe in every run (not the noise's seed: the two draws would match)
        torch.manual_seed(config.seed + 1)
        x0, context = conditioning(models, ids, layouts, config, device)
    generator = torch.Generator(device).manual_seed(config.seed)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    t = torch.linspace(100, 900, len(x0), device=device).long()
    return TextProbe(diffused(alphas, x0, noise, t), noise, t, context, context.roll(1, 0))


@torch.no_grad()
def text_gap(unet: Any, probe: TextProbe, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """How much the UNet uses the caption: its epsilon MSE on the probe given another scene's caption minus given
    the scene's own (0: the text is ignored). Why: the training MSE cannot tell -- v2's UNet under the word readout,
    reading almost nothing of the words, trains at the same MSE as with the full readout."""
    def mse(context: torch.Tensor) -> float:
        with autocast(config, device):
            prediction = unet(probe.noisy, probe.t, encoder_hidden_states=context).sample.float()
        return F.mse_loss(prediction, probe.noise).item()

    own, other = mse(probe.context), mse(probe.rolled)
    return {"probe_mse": round(own, 5), "text_gap": round(other - own, 5)}


def train_unet(models: Models, config: TrainConfig, device: torch.device, budget: Budget) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    unet = models.unet.to(device).train()
    model = torch.compile(unet) if config.compile else unet
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.to(device)
    first = models.steps["unet"]
    warmup = config.resume_warmup if first else config.warmup
    optimizer, schedule = optimiser(unet.parameters(), config.unet_lr, warmup)
    ema = EMAModel(unet.parameters(), decay=config.ema, use_ema_warmup=True)
    batches = Batches(lambda s: captioned(config, models.tokenizer, "unet", s, config.unet_batch, config.uncond),
                      first + 1)
    probe = make_text_probe(models, config, device, alphas) if config.probe_scenes else None
    torch.manual_seed(config.seed + first)
    start, running = time.monotonic(), []
    for local in stage_steps(config, budget):
        step = first + local
        layouts, ids = batches()
        x0, context = conditioning(models, ids, layouts, config, device)
        noisy, noise, t = noised(alphas, x0)
        with autocast(config, device):
            prediction = model(noisy, t, encoder_hidden_states=context).sample.float()
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas, t, config.min_snr)).mean()
        descend(optimizer, schedule, loss, list(unet.parameters()))
        ema.step(unet.parameters())
        running.append(per_sample.mean().detach())
        if local % config.log_every == 0:
            gap = text_gap(unet, probe, config, device) if probe is not None else {}
            log(config, {"stage": "unet", "step": step, "mse": round(torch.stack(running).mean().item(), 5), **gap,
                         "minutes": round((time.monotonic() - start) / 60, 2)})
            running = []
        models.steps["unet"] = step
    batches.close()
    ema.copy_to(unet.parameters())
    models.unet = unet.eval()


def load_resumed(folder: Path, device: torch.device) -> Models:
    """Whatever a previous run saved in ``folder`` (fp32 on ``device``; the text encoder with the folder's readout)
    and its step counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    models = Models()
    if (folder / "tokenizer").is_dir():
        models.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    parts = {"text_encoder": readout_class(folder_readout(folder)), "vae": AutoencoderKL,
             "unet": UNet2DConditionModel}
    for name, cls in parts.items():
        if (folder / name / "config.json").is_file():
            module = cls.from_pretrained(folder / name, torch_dtype=torch.float32).to(device)
            setattr(models, name, module.eval() if name != "unet" else module)
    if (folder / "compass" / "compass_config.json").is_file():
        from ..diffusion.compass_train import load_trained_compass

        models.compass = load_trained_compass(folder / "compass").to(device)
    report = folder / "train_report.json"
    if report.is_file():
        models.steps.update(json.loads(report.read_text()).get("steps", {}))
    if models.text_encoder is not None:
        models.text_encoder.requires_grad_(False)
    return models


def assemble(models: Models) -> Any:
    """The SD pipeline of whatever exists so far (missing parts are None)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**SD15_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save(models: Models, config: TrainConfig, folder: Path, previous: list[dict[str, Any]]) -> None:
    """Weights in fp16, files <= 14 MB, and the report of every run so far (``previous`` + this one)."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = [m for m in (models.text_encoder, models.vae, models.unet) if m is not None]
    for module in modules:
        module.half()
    try:
        for name in ("tokenizer", "text_encoder", "vae", "unet"):
            part = getattr(models, name)
            if part is not None:
                part.save_pretrained(folder / name, **({} if name == "tokenizer" else
                                                       {"safe_serialization": True, "max_shard_size": MAX_SHARD}))
        if models.vae is not None and models.unet is not None:
            assemble(models).save_config(folder)  # model_index.json
            assemble(models).scheduler.save_pretrained(folder / "scheduler")
    finally:
        for module in modules:
            module.float()
    if models.compass is not None:
        from .compass_v2 import save_compass

        save_compass(models.compass, folder / "compass", models.steps["compass"])
    run = {"config": {k: v for k, v in asdict(config).items() if k != "history"}, "history": config.history}
    (folder / "train_report.json").write_text(json.dumps({"steps": models.steps, "runs": previous + [run],
                                                          "parameters": parameter_counts(models)}, indent=1))


def parameter_counts(models: Models) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(models, name).parameters())
            for name in ("text_encoder", "vae", "unet", "compass") if getattr(models, name) is not None}


def pack(folder: Path, target: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``folder`` as an uncompressed tar split into parts <= 15 MiB (the device returns at most 8 files of 16 MiB),
    plus the report and samples as plain files. Unpack with: cat PREFIX.tar.part* | tar -x -C DEST."""
    target.mkdir(parents=True, exist_ok=True)
    archive = target / f"{folder.name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=folder.name)
    parts = []
    with open(archive, "rb") as whole:
        while chunk := whole.read(part_bytes):
            parts.append(target / f"{archive.name}.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    archive.unlink()
    for name in ("train_report.json", "samples.png"):
        if (folder / name).is_file():
            shutil.copy(folder / name, target / name)
    return parts


@torch.no_grad()
def sample_sheet(models: Models, config: TrainConfig, device: torch.device, folder: Path, seeds: int = 4) -> None:
    """Held-out swapped prompts, headings and single objects, ``seeds`` each: a quick look at what was learnt."""
    from PIL import Image

    prompts = ([p for p, _ in scenes_v2.swapped_prompts()[::5]] + [p for p, _ in scenes_v2.heading_prompts()[::2]]
               + [p for p, _, _ in scenes_v2.single_object_prompts()[::7]])
    pipe = assemble(models).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(0)
        with autocast(config, device):
            rows.append(pipe(prompt, num_inference_steps=25, guidance_scale=5.0, height=config.size,
                             width=config.size, num_images_per_prompt=seeds, generator=generator).images)
    sheet = Image.new("RGB", (config.size * seeds, config.size * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image, (c * config.size, r * config.size))
    sheet.save(folder / "samples.png")
    (folder / "samples.json").write_text(json.dumps({"rows": prompts, "seeds": seeds}, indent=1))


def stage_budgets(config: TrainConfig, stages: list[str], started: float) -> Callable[[str], Budget]:
    """Each stage's budget, fixed when it starts: ``unet`` gets what is left after the later stages' shares."""
    fixed = {"clip": config.clip_minutes, "vae": config.vae_minutes, "compass": config.compass_minutes}

    def budget(stage: str) -> Budget:
        if stage != "unet":
            return Budget(max(0.01, fixed[stage]))  # Budget(0) would mean no limit
        used = (time.monotonic() - started) / 60
        later = sum(fixed[s] for s in stages[stages.index(stage) + 1:])
        return Budget(max(0.05, config.minutes - used - later - config.reserve_minutes))

    return budget


def check_stages(stages: list[str], models: Models, new_text_encoder: bool = False) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"Unknown stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    for stage, part in (("clip", "text_encoder"), ("vae", "vae")):
        if stage in stages and getattr(models, part) is not None and not (stage == "clip" and new_text_encoder):
            raise SystemExit(f"The resumed folder already has a trained {part}; it stays frozen (the UNet was "
                             f"trained on it). Drop '{stage}' from --stages, or pass --new-text-encoder to replace "
                             "the text tower and continue the UNet on it.")
    needs = {"unet": ["text_encoder", "vae"], "compass": ["text_encoder", "vae", "unet"]}
    done = {"clip": "text_encoder", "vae": "vae", "unet": "unet"}
    for stage in stages:
        missing = [p for p in needs.get(stage, []) if getattr(models, p) is None
                   and not any(done.get(s) == p for s in stages[:stages.index(stage)])]
        if missing:
            raise SystemExit(f"Stage {stage!r} needs {missing}: run those stages first or --resume a folder with them.")


def train(config: TrainConfig) -> Path:
    device = torch.device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started, out = time.monotonic(), Path(config.out)
    stages = [s for s in config.stages.split(",") if s]
    resumed = Path(config.resume) if config.resume else None
    models = load_resumed(resumed, device) if resumed else Models()
    previous = json.loads((resumed / "train_report.json").read_text())["runs"] if resumed and (
        resumed / "train_report.json").is_file() else []
    check_stages(stages, models, config.new_text_encoder)
    config.text_readout = config.text_readout or (folder_readout(resumed) if resumed else "all")
    if config.text_readout not in READOUTS:
        raise SystemExit(f"Unknown --text-readout {config.text_readout!r}; choose from {', '.join(READOUTS)}.")
    if models.text_encoder is not None:
        models.text_encoder = with_readout(models.text_encoder, config.text_readout)
    if models.tokenizer is None or (config.new_text_encoder and "clip" in stages):
        models.tokenizer = text_v2.build_tokenizer()  # a new tower takes today's vocabulary
    budget_of = stage_budgets(config, [s for s in STAGES if s in stages], started)
    for stage in [s for s in STAGES if s in stages]:
        if stage == "unet" and models.unet is None:
            torch.manual_seed(config.seed)
            models.unet = build_unet(config, models.text_encoder.config.hidden_size)
        log(config, {"stage": stage, "start": True, "minutes_so_far": round((time.monotonic() - started) / 60, 2)})
        run_stage(stage, models, config, device, budget_of(stage))
        save(models, config, out, previous)
    if config.samples and models.unet is not None:
        sample_sheet(models, config, device, out)
    log(config, {"done": True, "steps": models.steps, "minutes": round((time.monotonic() - started) / 60, 2)})
    save(models, config, out, previous)
    if config.pack:
        pack(out, Path(config.pack))
    return out


def run_stage(stage: str, models: Models, config: TrainConfig, device: torch.device, budget: Budget) -> None:
    if stage == "compass":
        from .compass_v2 import train_compass

        train_compass(models, config, device, budget)
    else:
        {"clip": train_clip, "vae": train_vae, "unet": train_unet}[stage](models, config, device, budget)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    train(parse_args())
