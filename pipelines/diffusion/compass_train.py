"""Train a Compass Control angle encoder (and optionally a rank-r UNet LoRA) with the diffusion loss.

    python -m pipelines.diffusion.compass_train --data rows.jsonl --out ckpt/ [--model tiny|DIR|HUB_ID]
    python -m pipelines.diffusion.compass_train --synthetic 32 --out ckpt/ --model tiny --steps 60

Each row of ``rows.jsonl``: {"image": path, "object": word, "angle": degrees, "box": [x0, y0, x1, y1]}
(optionally "prompt" with the object word in it; default "a photo of a {object}"). As in the paper the text
encoder and UNet stay frozen; the encoder's token goes in through the input embedding table, and CALL confines
the compass and object tokens to the box and the compass token's key gets the object's (``class2special_soft``)
during training as at inference (official: lr 1e-4, LoRA rank 4).
``--synthetic N`` draws N arrow images pointing along their angle, for smoke runs and the tests.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .attention import AttentionControl
from .compass import PLACEHOLDER, CompassEncoder, CompassObject, ensure_placeholders, insert_compass_tokens, localise


@dataclass
class Row:
    image: Path
    object: str
    angle: float
    box: tuple[float, float, float, float]
    prompt: str = ""


def read_rows(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            image = Path(item["image"])
            rows.append(Row(image if image.is_absolute() else path.parent / image, item["object"],
                            float(item["angle"]), tuple(item["box"]), item.get("prompt", "")))
    return rows


def draw_arrow(angle: float, box: tuple[float, ...], size: int) -> Image.Image:
    """An arrow inside ``box`` whose head points along ``angle`` (0 = towards the viewer = down the image)."""
    image = Image.new("RGB", (size, size), (235, 235, 225))
    x0, y0, x1, y1 = (v * size for v in box)
    cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    heading = math.radians(angle)
    dx, dy = math.sin(heading), math.cos(heading)
    tip = (cx + dx * radius, cy + dy * radius)
    tail = (cx - dx * radius, cy - dy * radius)
    side = (-dy * radius * 0.5, dx * radius * 0.5)
    draw = ImageDraw.Draw(image)
    draw.line([tail, tip], fill=(200, 30, 30), width=max(1, size // 16))
    draw.polygon([tip, (cx + side[0], cy + side[1]), (cx - side[0], cy - side[1])], fill=(200, 30, 30))
    return image


def synthetic_rows(count: int, folder: Path, size: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        angle = rng.uniform(0, 360)
        w = rng.uniform(0.4, 0.7)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - w)
        box = (x0, y0, x0 + w, y0 + w)
        path = folder / f"arrow-{index:04d}.png"
        draw_arrow(angle, box, size).save(path)
        rows.append(Row(path, "arrow", angle, box))
    return rows


def load_training_pipe(model: str) -> Any:
    if model == "tiny":
        from ..tiny import tiny_sd15_pipeline

        return tiny_sd15_pipeline()
    from diffusers import StableDiffusionPipeline

    from .models import import_own_components

    import_own_components(model)
    return StableDiffusionPipeline.from_pretrained(model)


def image_tensor(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0


class CompassTrainer:
    """Holds the frozen pipeline, the trainable encoder (and LoRA) and computes the denoising loss of a row."""

    def __init__(self, pipe: Any, width: int, lora_rank: int = 0, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.pipe = pipe
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        self.encoder = CompassEncoder(width)
        self.placeholder = ensure_placeholders(pipe.tokenizer, pipe.text_encoder, 1)[0]
        self.lora_rank = lora_rank
        if lora_rank:
            from peft import LoraConfig

            pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        self.current: torch.Tensor | None = None
        pipe.text_encoder.get_input_embeddings().register_forward_hook(self._inject)

    def parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.encoder.parameters())
        return params + [p for n, p in self.pipe.unet.named_parameters() if "lora_" in n]

    def _inject(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Replace the placeholder's table row with the encoder's (differentiable) vector."""
        if self.current is None:
            return output
        is_placeholder = (inputs[0] == self.placeholder)[..., None]
        return torch.where(is_placeholder, self.current.to(output.dtype), output)

    def loss(self, row: Row, size: int, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        obj = CompassObject(row.object, row.angle, row.box)
        prompt = row.prompt or f"a photo of a {row.object}"
        compass = insert_compass_tokens(prompt, [obj], pipe.tokenizer)
        ids = pipe.tokenizer(compass.text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        self.current = self.encoder(torch.tensor([row.angle]))[0]
        try:
            embeds = pipe.text_encoder(ids)[0]
        finally:
            self.current = None
        with torch.no_grad():
            latents = pipe.vae.encode(image_tensor(row.image, size)[None]).latent_dist.mean
            latents = latents * pipe.vae.config.scaling_factor
        noisy = pipe.scheduler.add_noise(latents, noise, timestep)
        control = AttentionControl(pipe.unet)
        control.cfg = False
        localise(control, compass, [obj])
        with control:
            prediction = pipe.unet(noisy, timestep, encoder_hidden_states=embeds).sample
        return F.mse_loss(prediction.float(), noise.float())


def evaluate(trainer: CompassTrainer, rows: list[Row], size: int,
             probes: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return float(np.mean([trainer.loss(row, size, *probe).item() for row, probe in zip(rows, probes)]))


def train(rows: list[Row], pipe: Any, steps: int, lr: float, size: int, lora_rank: int,
          seed: int) -> tuple[CompassTrainer, dict]:
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    trainer = CompassTrainer(pipe, width, lora_rank, seed)
    latent_size = size // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    generator = torch.Generator().manual_seed(seed)
    num_train = pipe.scheduler.config.num_train_timesteps

    def probe() -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(1, channels, latent_size, latent_size, generator=generator)
        return noise, torch.randint(0, num_train, (1,), generator=generator)

    probes = [probe() for _ in rows]  # fixed noise and timesteps: the evaluation loss is comparable over time
    initial = evaluate(trainer, rows, size, probes)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=lr)
    order = random.Random(seed)
    for _ in range(steps):
        row = order.choice(rows)
        loss = trainer.loss(row, size, *probe())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = evaluate(trainer, rows, size, probes)
    return trainer, {"initial_loss": initial, "final_loss": final, "steps": steps, "rows": len(rows)}


def save(trainer: CompassTrainer, out: Path, report: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(trainer.encoder.state_dict(), str(out / "compass_encoder.safetensors"))
    if trainer.lora_rank:
        from peft.utils import get_peft_model_state_dict

        save_file(get_peft_model_state_dict(trainer.pipe.unet), str(out / "unet_lora.safetensors"))
    width = trainer.encoder.linear1.out_features
    (out / "compass_config.json").write_text(json.dumps({"width": width, "lora_rank": trainer.lora_rank,
                                                         "placeholder": PLACEHOLDER, **report}, indent=2))


def load_trained_compass(folder: str | Path) -> CompassEncoder:
    """Load an encoder saved by this script (``compass_encoder.safetensors`` + ``compass_config.json``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "compass_config.json").read_text())
    encoder = CompassEncoder(int(config["width"]))
    encoder.load_state_dict(load_file(str(folder / "compass_encoder.safetensors")))
    return encoder.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a local SD folder or a Hub id")
    parser.add_argument("--data", type=Path, help="rows.jsonl of (image, object, angle, box)")
    parser.add_argument("--synthetic", type=int, default=0, help="draw N synthetic arrow rows instead of --data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4, help="official: 1e-4")
    parser.add_argument("--lora-rank", type=int, default=4, help="official: 4; 0 trains the encoder alone")
    parser.add_argument("--resolution", type=int, default=0, help="default: 32 for tiny, 512 otherwise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = args.resolution or (32 if args.model == "tiny" else 512)
    if args.synthetic:
        rows = synthetic_rows(args.synthetic, args.out / "data", size, args.seed)
    elif args.data:
        rows = read_rows(args.data)
    else:
        parser.error("give --data rows.jsonl or --synthetic N")
    trainer, report = train(rows, load_training_pipe(args.model), args.steps, args.lr, size, args.lora_rank, args.seed)
    save(trainer, args.out, report)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
