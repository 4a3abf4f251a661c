"""Train a motion adapter for micro-world v2 on moving scenes (``motion_v2``), within a wall-clock budget;
resumable. The result is a diffusers ``MotionAdapter`` folder that ``AnimateDiffPipeline`` puts on the frozen
micro-world v2 pipeline (``weights_v2``): the video tab's offline model.

    # one accelerator call: train, sample a frame strip, pack the folder for the trip back
    python -m pipelines.microworld.train_motion --minutes 8 --out outputs/weights_motion_v2 --pack "$OUT"
    # continue a saved adapter (the folder unpacked and carried)
    python -m pipelines.microworld.train_motion --minutes 8 --resume outputs/weights_motion_v2 \
        --out outputs/weights_motion_v2 --pack "$OUT"
    # continue the committed adapter with a spatial LoRA (rank 8 now; later runs resume it at its saved rank)
    python -m pipelines.microworld.train_motion --minutes 7 --resume pipelines/microworld/weights_motion_v2 \
        --out outputs/weights_motion_v2 --weighting v --spatial-lora 8 --pack "$OUT"
    # back home: cat weights_motion_v2.tar.part* | tar -x -C pipelines/microworld/

As AnimateDiff trains its motion modules: the image UNet, VAE and text encoder stay frozen; the adapter's
temporal transformers are inserted after every spatial layer (``UNetMotionModel.from_unet2d``) with their output
projections zeroed, so training starts from the image model run frame by frame; epsilon MSE over all frames of
clips noised at one timestep each, with the image UNet's own noise schedule (SD1.5's scaled-linear betas, which
micro-world v2 was trained with -- not AnimateDiff's linear ones, hence ``linear_betas=False`` when serving).
The adapter copies the UNet's layout: its block channels, layers per block, group-norm groups (the motion
modules' norms take the UNet's ``norm_num_groups`` when inflated) and head counts (head width 32-36, as the
spatial attention). Data: clips rendered on the device each step, seeded by (seed, step).

What to read in the log: ``loss`` barely moves (the frozen image model explains nearly all of it); the probe does
(``make_probe``): ``mse/image_t<T>``, the adapter's MSE over the image model's at noise level T (run 1, 966 steps:
1.00 at t=100, 0.92 at t=500, 0.53 at t=900 -- the temporal modules hold the layout, where it is decided), and
``direction``, > 0 once reversed direction words hurt (run 1: -0.0008, i.e. the words were ignored). ``--weighting
v`` gives the high-noise steps their share of the gradient (``loss_weights``).

``--spatial-lora RANK``: diffusers' motion modules get no caption states, so text reaches motion only through the
frozen image UNet's spatial features, and an image model trained on stills has no use for a heading word (the likely
reason the words were ignored). The option also trains a LoRA on the spatial cross-attention's ``to_k``/``to_v``
(the only projections that read the caption; ``add_spatial_lora``) with the motion modules: one optimiser, one EMA
over both. Its B starts at zero, so a resumed adapter without one starts exactly where it was (``direction`` about
-0.0008). Read ``direction`` over the run: above 0 once the words steer motion through the LoRA, still about 0 if
this route was not what held them back; ``mse/image_t*`` now also carry the LoRA's change to each frame. The LoRA is
saved beside the adapter as ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format, ``unet.``-prefixed keys,
so ``pipe.load_lora_weights`` reads it), packed with it, resumed from ``--resume`` at its saved rank, and fused into
the video tab's motion UNet when serving (``diffusion/animatediff.fuse_spatial_lora``). 0, the default, trains the
motion modules alone, as before.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.animatediff import SPATIAL_LORA
from . import WEIGHTS_V2, motion_v2, text_v2
from .train_v2 import (MAX_SHARD, SD15_SCHEDULE, Batches, Budget, Models, autocast, descend, diffused,
                       latents_of, load_resumed, log, noised, optimiser, pack, parse_config, thread_tokenizer)


@dataclass
class MotionConfig:
    base: str = str(WEIGHTS_V2)  # the frozen micro-world v2 pipeline folder
    out: str = "outputs/weights_motion_v2"
    resume: str = ""  # an adapter folder saved by this script: its weights loaded, its step count continued
    minutes: float = 8.0  # the whole run, samples and saving included
    reserve_minutes: float = 0.8  # saving, samples (about 20 s on an H100) and packing after training
    max_steps: int = 0  # 0 = until the time is up: smoke runs and tests
    device: str = "cuda"
    dtype: str = "bf16"  # autocast on CUDA: bf16 | fp32
    frames: int = motion_v2.FRAMES
    max_seq_length: int = 32  # AnimateDiff's; >= frames (FreeNoise windows of 16 need no more)
    batch: int = 16  # clips per step: batch x frames images through the UNet (256, the image stage's batch)
    lr: float = 1e-4  # AnimateDiff trains its motion modules at 1e-4
    warmup: int = 100
    uncond: float = 0.1  # empty captions, so guidance's unconditional branch also moves
    ema: float = 0.999  # over every trainable parameter: the motion modules and the spatial LoRA
    weighting: str = "eps"  # eps (AnimateDiff: plain epsilon MSE) | v (see ``loss_weights``)
    spatial_lora: int = 0  # rank of a LoRA on the spatial attn2.to_k/to_v trained too (0: off); ``add_spatial_lora``
    probe_clips: int = 10  # the held-out probe logged with every log line (0: off); see ``make_probe``
    log_every: int = 25
    seed: int = 0
    samples: bool = True
    sample_steps: int = 25
    sample_videos: int = 4  # seeds per sample prompt (the strip shows the first)
    pack: str = ""  # also write the folder as a split tar (parts <= 15 MiB), report and samples here
    history: list[dict[str, Any]] = field(default_factory=list)


def adapter_config(unet_config: Any, max_seq_length: int) -> dict[str, Any]:
    """``MotionAdapter`` arguments matching a UNet2DConditionModel's layout (diffusers calls the spatial head count
    ``attention_head_dim``)."""
    channels = tuple(unet_config.block_out_channels)
    heads = unet_config.attention_head_dim
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
    return dict(block_out_channels=channels, motion_layers_per_block=unet_config.layers_per_block,
                motion_norm_num_groups=unet_config.norm_num_groups, motion_num_attention_heads=heads,
                motion_max_seq_length=max_seq_length, use_motion_mid_block=True)


def build_adapter(unet_config: Any, max_seq_length: int = 32, seed: int = 0) -> Any:
    """A fresh adapter whose temporal transformers add nothing yet (output projections zeroed, as AnimateDiff's
    ``zero_initialize``): the inflated UNet starts as the image model applied to each frame."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(**adapter_config(unet_config, max_seq_length))
    for name, module in adapter.named_modules():
        if name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return adapter


def motion_unet(unet: Any, adapter: Any) -> Any:
    """The UNet inflated with ``adapter``; only the motion modules train."""
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_unet2d(unet, adapter)
    model.freeze_unet2d_params()
    return model


# The projections that read the caption states: the only place a direction word can change what the frozen
# spatial layers hand the motion modules. Only the spatial transformers' (``attentions``): the motion modules' blocks
# have an ``attn2`` too, a temporal self-attention.
SPATIAL_LORA_TARGETS = r".*\.attentions\.\d+\.transformer_blocks\.\d+\.attn2\.(to_k|to_v)"


def add_spatial_lora(model: Any, rank: int) -> None:
    """A LoRA on the spatial cross-attention's key and value projections of an inflated UNet, trained with its
    motion modules: the image UNet was trained on stills, where a heading word changes nothing, so its features
    carry no direction for the temporal layers to read (AnimateDiff v3 adapts the image model with a spatial LoRA
    too, its "domain adapter"). B starts at zero (peft's default): the model starts exactly as without it.
    ``lora_alpha`` = rank (scale 1), what diffusers' loader assumes for a file without alpha."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=SPATIAL_LORA_TARGETS))
    model.freeze_unet2d_params()  # peft left only its own parameters trainable: the motion modules train again
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


def spatial_lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA's weights, keyed as diffusers' ``unet_lora_layers`` (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def saved_lora(folder: Path) -> dict[str, torch.Tensor]:
    """The spatial LoRA saved in ``folder`` (diffusers' keys), or {} where there is none."""
    from safetensors.torch import load_file

    return load_file(str(folder / SPATIAL_LORA)) if (folder / SPATIAL_LORA).is_file() else {}


def spatial_lora(model: Any, config: MotionConfig) -> int:
    """Put the spatial LoRA on ``model``: the resumed folder's (its rank wins, as its adapter's layout does), else a
    fresh one of rank ``spatial_lora``; returns the rank (0: none, today's model)."""
    from peft.utils import set_peft_model_state_dict

    saved = saved_lora(Path(config.resume)) if config.resume else {}
    resumed = next((v.shape[0] for k, v in saved.items() if ".lora_A." in k), 0)
    if resumed and config.spatial_lora not in (0, resumed):
        raise SystemExit(f"--spatial-lora {config.spatial_lora}: {config.resume} holds a rank-{resumed} LoRA.")
    rank = resumed or config.spatial_lora
    if rank:
        add_spatial_lora(model, rank)
    if resumed:
        loaded = set_peft_model_state_dict(model, {k.removeprefix("unet."): v.float() for k, v in saved.items()})
        missing = [k for k in loaded.missing_keys if ".lora_" in k]
        if loaded.unexpected_keys or missing:
            raise SystemExit(f"{config.resume}/{SPATIAL_LORA} does not fit: {(loaded.unexpected_keys + missing)[:3]}")
    return rank


def adapter_of(model: Any, config: dict[str, Any]) -> Any:
    """The motion modules of an inflated UNet as a standalone ``MotionAdapter`` (same parameter names)."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter(**config)
    adapter.load_state_dict({k: v for k, v in model.state_dict().items() if "motion_modules" in k})
    return adapter


def clip_batch(config: MotionConfig, tokenizer: Any, step: int, size: int) -> tuple[motion_v2.Clips, torch.Tensor]:
    """(clips, caption ids) for one step, seeded by (seed, step); ``uncond`` of the captions empty."""
    clips = motion_v2.sample_clips(config.batch, (config.seed, 5, step), config.frames, size)
    rng = np.random.default_rng((config.seed, 5, step, 1))
    captions = ["" if rng.random() < config.uncond else motion_v2.clip_caption(clips, i, rng)
                for i in range(len(clips))]
    return clips, text_v2.tokenize(thread_tokenizer(tokenizer), captions)


@torch.no_grad()
def video_latents(models: Models, videos: torch.Tensor, config: MotionConfig, device: torch.device) -> torch.Tensor:
    """[batch, frames, 3, H, W] in [0, 1] -> scaled latents [batch, 4, frames, h, w] (AnimateDiff's layout)."""
    latents = latents_of(models, videos.flatten(0, 1), config, device)
    return latents.unflatten(0, videos.shape[:2]).transpose(1, 2)


def loss_weights(alphas: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-clip weights of the epsilon MSE. "eps": 1, AnimateDiff's. "v": 1 / alpha_bar_t, which turns the epsilon
    error into the v-prediction objective's error (v - v_hat = (eps - eps_hat) / sqrt(alpha_bar_t)). Why: on these
    clips the frozen image model's epsilon MSE is ~100x larger at t=50 than at t=950 and mostly out of a temporal
    module's reach, so uniform weights hand the gradient to the low-noise steps, while a clip's layout and motion
    are decided at the high-noise ones; "v" gives each noise level a like share (the weight tops out at ~210)."""
    if weighting == "eps":
        return torch.ones_like(t, dtype=torch.float32)
    if weighting == "v":
        return 1.0 / alphas[t].float()
    raise ValueError(f"--weighting {weighting!r}: use eps or v.")


def motion_loss(model: Any, latents: torch.Tensor, context: torch.Tensor, alphas: torch.Tensor,
                config: MotionConfig, device: torch.device) -> torch.Tensor:
    """Epsilon MSE over every frame (weighted per clip by ``loss_weights``); one timestep per clip (its frames share
    a noise level, as at sampling). The caption states go to every frame (diffusers' UNetMotionModel takes them per
    frame, as the pipeline repeats)."""
    b, c, f, h, w = latents.shape
    noisy, noise, t = noised(alphas, latents.reshape(b, c * f, h, w))  # per-clip t through the image helper
    with autocast(config, device):
        prediction = model(noisy.view(b, c, f, h, w), t,
                           encoder_hidden_states=context.repeat_interleave(f, dim=0)).sample.float()
    per_clip = F.mse_loss(prediction, noise.view(b, c, f, h, w), reduction="none").mean((1, 2, 3, 4))
    return (per_clip * loss_weights(alphas, t, config.weighting)).mean()


PROBE_T = (100, 300, 500, 700, 900)  # the probe's noise levels, a band each


@dataclass
class Probe:
    """A fixed held-out batch to read progress from, since the training MSE cannot show it: the frozen image model
    already explains nearly all of it (run 1: 0.057 for the image model alone vs 0.052 with the adapter after 966
    steps, on the same clips and noise). ``image``: the image model's epsilon MSE per clip, frame by frame, with the
    true captions and with the reversed ones."""

    noisy: torch.Tensor  # [clips, 4, frames, h, w]
    noise: torch.Tensor
    t: torch.Tensor  # PROBE_T cycled over the clips
    context: torch.Tensor  # the true captions' states
    reversed_context: torch.Tensor  # the same captions with every direction word the opposite way
    image: torch.Tensor
    image_reversed: torch.Tensor


@torch.no_grad()
def make_probe(models: Models, config: MotionConfig, device: torch.device, alphas: torch.Tensor) -> Probe:
    """``probe_clips`` clips from a seed no training step uses, noised once, captioned twice (true, reversed)."""
    size = models.vae.config.sample_size
    clips = motion_v2.sample_clips(config.probe_clips, (config.seed, 6), config.frames, size)
    captions = [[motion_v2.clip_caption(clips, i, np.random.default_rng((config.seed, 6, i)), reverse)
                 for i in range(len(clips))] for reverse in (False, True)]
    context, reversed_context = (models.text_encoder(text_v2.tokenize(models.tokenizer, c).to(device))[0].float()
                                 for c in captions)
    latents = video_latents(models, motion_v2.render_clips(clips, device)[0], config, device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = torch.tensor(PROBE_T, device=device).repeat(len(clips))[:len(clips)]
    noisy = diffused(alphas, latents, noise, t)
    f, frames, image = config.frames, noisy.transpose(1, 2).flatten(0, 1), []
    for states in (context, reversed_context):
        with autocast(config, device):
            prediction = models.unet(frames, t.repeat_interleave(f), states.repeat_interleave(f, 0)).sample.float()
        image.append(((prediction.unflatten(0, (len(clips), f)).transpose(1, 2) - noise) ** 2).mean((1, 2, 3, 4)))
    return Probe(noisy, noise, t, context, reversed_context, *image)


@torch.no_grad()
def probe_report(model: Any, probe: Probe, config: MotionConfig, device: torch.device) -> dict[str, float]:
    """Per noise level, the adapter's epsilon MSE over the image model's (``mse/image_t900`` < 1: the motion modules
    help there), and ``direction``: how much more the reversed captions raise its MSE than they raise the image
    model's (reversed over true, each; 0 for the image model itself, > 0 once the direction words steer motion)."""
    f, mse = config.frames, {}
    for name, context in (("true", probe.context), ("reversed", probe.reversed_context)):
        with autocast(config, device):
            prediction = model(probe.noisy, probe.t, encoder_hidden_states=context.repeat_interleave(f, 0))
        mse[name] = ((prediction.sample.float() - probe.noise) ** 2).mean((1, 2, 3, 4))
    report = {f"mse/image_t{t}": round((mse["true"][probe.t == t].sum() / probe.image[probe.t == t].sum()).item(), 4)
              for t in PROBE_T if (probe.t == t).any()}
    image = probe.image_reversed.sum() / probe.image.sum()
    report["direction"] = round((mse["reversed"].sum() / mse["true"].sum() - image).item(), 5)
    return report


def load_models(config: MotionConfig, device: torch.device
                ) -> tuple[Models, Any, dict[str, Any], int, list[dict[str, Any]]]:
    """(frozen micro-world parts, the adapter to train, its config, steps done so far, the earlier runs' reports)."""
    from diffusers import MotionAdapter

    models = load_resumed(Path(config.base), device)
    if models.unet is None or models.vae is None or models.text_encoder is None:
        raise SystemExit(f"{config.base} is not a complete micro-world v2 folder (tokenizer, text_encoder, vae, unet).")
    models.unet.requires_grad_(False)
    models.vae.requires_grad_(False)
    settings = adapter_config(models.unet.config, config.max_seq_length)
    if not config.resume:
        return models, build_adapter(models.unet.config, config.max_seq_length, config.seed), settings, 0, []
    adapter = MotionAdapter.from_pretrained(config.resume, torch_dtype=torch.float32)
    settings = {k: adapter.config[k] for k in settings}
    report = Path(config.resume) / "train_report.json"
    earlier = json.loads(report.read_text()) if report.is_file() else {"steps": 0, "runs": []}
    return models, adapter, settings, earlier["steps"], earlier["runs"]


def train_steps(model: Any, models: Models, config: MotionConfig, device: torch.device, budget: Budget,
                first: int) -> int:
    """Train the motion modules of ``model`` until the budget or ``max_steps``; returns the last step."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimiser(params, config.lr, config.warmup)
    ema = EMAModel(params, decay=config.ema, use_ema_warmup=True)
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.to(device)
    size = models.vae.config.sample_size
    batches = Batches(lambda s: clip_batch(config, models.tokenizer, s, size), first + 1)
    torch.manual_seed(config.seed + first)
    probe = make_probe(models, config, device, alphas) if config.probe_clips > 0 else None
    start, running, step = time.monotonic(), [], first
    while budget.left() and (config.max_steps <= 0 or step - first < config.max_steps):
        step += 1
        clips, ids = batches()
        latents = video_latents(models, motion_v2.render_clips(clips, device)[0], config, device)
        with torch.no_grad(), autocast(config, device):
            context = models.text_encoder(ids.to(device))[0].float()
        loss = motion_loss(model, latents, context, alphas, config, device)
        descend(optimizer, schedule, loss, params)
        ema.step(params)
        running.append(loss.detach())
        if (step - first) % config.log_every == 0:
            row = {"step": step, "loss": round(torch.stack(running).mean().item(), 5),
                   "steps_per_s": round((step - first) / (time.monotonic() - start), 3)}
            log(config, row | (probe_report(model, probe, config, device) if probe else {}))
            running = []
    batches.close()
    ema.copy_to(params)
    return step


def save(adapter: Any, config: MotionConfig, folder: Path, steps: int, previous: list[dict[str, Any]],
         lora: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in fp16 (files <= 14 MB), the spatial LoRA (``lora``) beside it in diffusers' LoRA format (fp16,
    under 1 MB at rank 8), and the report of every run so far."""
    from diffusers import AnimateDiffPipeline

    folder.mkdir(parents=True, exist_ok=True)
    adapter.half().save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD)
    adapter.float()
    if lora:
        AnimateDiffPipeline.save_lora_weights(folder, unet_lora_layers={k: v.half() for k, v in lora.items()},
                                              weight_name=SPATIAL_LORA)
    else:  # a LoRA left in ``folder`` by an earlier run would be served with this adapter
        (folder / SPATIAL_LORA).unlink(missing_ok=True)
    run = {"config": {k: v for k, v in asdict(config).items() if k != "history"}, "history": config.history}
    report = {"steps": steps, "base": config.base, "runs": previous + [run],
              "parameters": sum(p.numel() for p in adapter.parameters()),
              "spatial_lora_parameters": sum(v.numel() for v in (lora or {}).values())}
    (folder / "train_report.json").write_text(json.dumps(report, indent=1))


def train(config: MotionConfig) -> Path:
    device = torch.device(config.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started, out = time.monotonic(), Path(config.out)
    if config.frames > config.max_seq_length:
        raise SystemExit(f"--frames {config.frames} exceeds --max-seq-length {config.max_seq_length}.")
    models, adapter, settings, first, previous = load_models(config, device)
    model = motion_unet(models.unet, adapter)
    rank = spatial_lora(model, config)
    model = model.to(device).train()
    log(config, {"start": True, "from_step": first, "spatial_lora": rank,
                 "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    budget = Budget(max(0.05, config.minutes - config.reserve_minutes - (time.monotonic() - started) / 60))
    steps = train_steps(model, models, config, device, budget, first)
    adapter = adapter_of(model.eval(), settings)
    lora = spatial_lora_state(model) if rank else None
    save(adapter, config, out, steps, previous, lora)
    if config.pack:  # packed before sampling too: a call killed while sampling still brings the weights back
        pack(out, Path(config.pack))
    if config.samples:
        sample_strip(models, model, config, device, out)
    log(config, {"done": True, "steps": steps, "minutes": round((time.monotonic() - started) / 60, 2)})
    save(adapter, config, out, steps, previous, lora)
    if config.pack:
        pack(out, Path(config.pack))
    return out


@torch.no_grad()
def sample_strip(models: Models, model: Any, config: MotionConfig, device: torch.device, folder: Path) -> None:
    """``motion_v2.motion_prompts``, ``sample_videos`` seeds each: the first as a frame strip (one row per prompt,
    one column per frame), and per single-object prompt ``motion_v2.stated_motion`` of every seed, with the share
    that moved over 5 px the stated way (chance, for frames drawn independently or a random direction: under half)."""
    from diffusers import AnimateDiffPipeline
    from PIL import Image

    from ..diffusion.animatediff import animatediff_scheduler
    from ..outputs import to_uint8

    pipe = AnimateDiffPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                               unet=model, motion_adapter=None, scheduler=animatediff_scheduler(config.base, False))
    pipe.set_progress_bar_config(disable=True)
    size, prompts, rows, reads = models.vae.config.sample_size, motion_v2.motion_prompts(), [], {}
    for prompt in prompts:
        videos = []
        for seed in range(config.sample_videos):  # one call per seed: num_videos_per_prompt returns one (0.42)
            with autocast(config, device):
                videos.append(pipe(prompt, num_frames=config.frames, height=size, width=size, guidance_scale=5.0,
                                   num_inference_steps=config.sample_steps, output_type="np",
                                   generator=torch.Generator("cpu").manual_seed(seed)).frames[0])
        videos = to_uint8(np.asarray(videos))
        rows.append(np.concatenate(list(videos[0]), axis=1))
        reads[prompt] = [motion_v2.stated_motion(prompt, video) for video in videos]
    Image.fromarray(np.concatenate(rows, axis=0)).save(folder / "samples.png")
    found = [read for per_prompt in reads.values() for read in per_prompt if read is not None]
    summary = {"moved_as_stated": round(float(np.mean([r["shift"] > 5 for r in found])), 3) if found else None,
               "median_step": float(np.median([r["step"] for r in found])) if found else None, "read": len(found)}
    log(config, {"samples": summary})
    (folder / "samples.json").write_text(json.dumps({"rows": prompts, "summary": summary, "reads": reads}, indent=1))


def parse_args(argv: list[str] | None = None) -> MotionConfig:
    return parse_config(MotionConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    train(parse_args())
