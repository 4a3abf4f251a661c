"""A Compass Control angle encoder trained for the frozen micro-world v2 model, in batches of rendered arrows.

As in the paper (and ``image.compass_train``, which trains one image at a time from files): text encoder and
UNet stay frozen; the encoder's vector replaces the placeholder token's input embedding, inserted right before
the object word, and CALL confines the compass and object tokens to the object's box and the compass token's key
gets its object token's key (``class2special_soft``) during training as at inference. Here every batch row is a
fresh scene whose arrow is captioned *without* its heading, so the heading can only come from the compass token;
each row gets its own CALL box and key share, registered by inference's own ``localise`` on that row alone.
The heading maps to Compass Control's angle convention as the control-effect benchmark does.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.attention import AttentionControl
from ..diffusion.compass import (PLACEHOLDER, CompassEncoder, CompassObject, CompassPrompt, ensure_placeholders,
                                 insert_compass_tokens, localise)
from . import scenes_v2, text_v2

ARROW = scenes_v2.SHAPES.index("arrow")


def compass_angle(heading: float) -> float:
    """Image-plane heading (0 = right, counter-clockwise) to Compass Control's angle (0 = facing the viewer, 90 =
    facing right, clockwise seen from above): pointing right is facing right, pointing up is facing away."""
    return (90.0 - heading) % 360.0


def arrow_scenes(batch: int, seed: tuple[int, ...], size: int) -> Any:
    """Scenes whose first object is the only arrow (the word "arrow" then names exactly one object)."""
    layouts = scenes_v2.sample_layouts(batch, seed, size)
    rng = np.random.default_rng((*seed, 2))
    others = layouts.shape[:, 1:]
    others[others == ARROW] = scenes_v2.SHAPES.index("circle")
    layouts.shape[:, 0] = ARROW
    layouts.heading[:, 0] = (45.0 * rng.integers(0, 8, batch) + rng.uniform(-8, 8, batch)) % 360
    layouts.heading[:, 1:] = np.where(layouts.shape[:, 1:] == scenes_v2.SHAPES.index("triangle"), 90.0, 0.0)
    return layouts


class PlaceholderInjection:
    """A forward hook on the input embeddings: rows holding the placeholder get this batch's encoder vectors."""

    def __init__(self, text_encoder: torch.nn.Module, placeholder: int) -> None:
        self.placeholder, self.vectors = placeholder, None
        text_encoder.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.vectors is None:
            return output
        hit = (inputs[0] == self.placeholder)[..., None]
        return torch.where(hit, self.vectors[:, None].to(output.dtype), output)


def localise_rows(control: AttentionControl, prompts: list[CompassPrompt], objects: list[CompassObject]) -> None:
    """Replace ``control``'s biases and key shares with CALL and ``class2special_soft`` for each batch row, made by
    the image tab's own ``localise`` and confined to that row (each row's caption puts its tokens elsewhere)."""
    control.biases, control.key_shares = [], []
    for i, (prompt, obj) in enumerate(zip(prompts, objects)):
        localise(control, prompt, [obj], rows=slice(i, i + 1))


def compass_batch(tokenizer: Any, config: Any, step: int, device: torch.device) -> dict[str, Any]:
    layouts = arrow_scenes(config.compass_batch, (config.seed, 3, step), config.size)
    images, coverage = scenes_v2.render_layouts(layouts, device)
    rng = np.random.default_rng((config.seed, 3, step, 1))
    prompts, objects = [], []
    for i, scene_boxes in enumerate(scenes_v2.boxes(coverage)):
        box = tuple(v / config.size for v in scene_boxes[0])
        objects.append(CompassObject("arrow", compass_angle(layouts.heading[i, 0]), box))
        prompts.append(insert_compass_tokens(scenes_v2.caption(layouts, i, rng, name_heading=False), objects[-1:],
                                             tokenizer))
    angles = torch.tensor([obj.angle for obj in objects], dtype=torch.float32, device=device)
    return {"images": images, "ids": text_v2.tokenize(tokenizer, [p.text for p in prompts]).to(device),
            "angles": angles, "prompts": prompts, "objects": objects}


def train_compass(models: Any, config: Any, device: torch.device, budget: Any) -> None:
    """Train ``models.compass`` (new, or continued) against the frozen UNet; the pipeline's own tokenizer and text
    encoder are left untouched (the placeholder lives in copies, as the image tab adds it at inference)."""
    from diffusers import DDPMScheduler

    from .train_v2 import SD15_SCHEDULE
    from .train_v2 import autocast, descend, latents_of, log, noised, optimiser, stage_steps

    tokenizer, text_encoder = copy.deepcopy(models.tokenizer), copy.deepcopy(models.text_encoder)
    injection = PlaceholderInjection(text_encoder, ensure_placeholders(tokenizer, text_encoder, 1)[0])
    for module in (text_encoder, models.unet, models.vae):
        module.requires_grad_(False).eval()
    torch.manual_seed(config.seed + models.steps["compass"])
    encoder = (models.compass or CompassEncoder(text_encoder.config.hidden_size)).to(device).train()
    optimizer, schedule = optimiser(encoder.parameters(), config.compass_lr,
                                    config.resume_warmup if models.steps["compass"] else config.warmup)
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.to(device)
    control = AttentionControl(models.unet)
    control.cfg = False
    start, running, done = time.monotonic(), [], 0
    for local in stage_steps(config, budget):
        done = local
        batch = compass_batch(tokenizer, config, models.steps["compass"] + local, device)
        noisy, noise, t = noised(alphas, latents_of(models, batch["images"], config, device))
        injection.vectors = encoder(batch["angles"])
        localise_rows(control, batch["prompts"], batch["objects"])
        control.applied.clear()  # the per-call log of applied biases would grow with every step
        with autocast(config, device), control:
            context = text_encoder(batch["ids"])[0]
            prediction = models.unet(noisy, t, encoder_hidden_states=context).sample.float()
        loss = F.mse_loss(prediction, noise)
        descend(optimizer, schedule, loss, list(encoder.parameters()))
        running.append(loss.detach())
        if local % config.log_every == 0:
            log(config, {"stage": "compass", "step": models.steps["compass"] + local,
                         "mse": round(torch.stack(running).mean().item(), 5),
                         "minutes": round((time.monotonic() - start) / 60, 2)})
            running = []
    models.steps["compass"] += done
    models.compass = encoder.eval()


def save_compass(encoder: CompassEncoder, folder: Path, steps: int) -> None:
    """The format ``image.compass_train.load_trained_compass`` (and so the image tab) reads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()},
              str(folder / "compass_encoder.safetensors"))
    config = {"width": encoder.linear1.out_features, "lora_rank": 0, "placeholder": PLACEHOLDER, "steps": steps,
              "trained_for": "micro-world v2 (pipelines/microworld/train_v2.py --stages compass)"}
    (folder / "compass_config.json").write_text(json.dumps(config, indent=2))
