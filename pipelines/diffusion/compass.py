"""Compass Control (Parihar et al., CVPR 2025): one orientation token per object, confined to its box.

Each object in the prompt gets a *compass token* inserted right before its object word. The token's input
embedding comes from an angle encoder and is written into the text encoder's input embedding table
(textual-inversion style), so CLIP contextualises it with the prompt. Coupled Attention Localisation (CALL)
then adds -inf to the logits of both the compass token and its object token for every query outside the
object's box (enlarged x1.2 and made square, as the official code does), in every cross-attention layer at every
step, through the shared attention-control layer. As in the official inference and training
(``--replace_attn_maps=class2special_soft``), the compass token's key also gets its object token's key added, so
the compass token attends where its object does; an encoder trained with it runs off its training distribution
without it. On every layer's grid each box keeps at least one cell (a coarse grid can be coarser than the box).

Encoders behind one interface (``__call__(angles_deg) -> [n, width]``):
- ``PhraseCompassEncoder`` (training-free, any SD model): the text encoder's own input embeddings of orientation
  phrases ("facing the viewer", "facing right", ...) interpolated on the circle by angle. An approximation: it
  gives the token a direction-bearing embedding without the paper's training.
- ``CompassEncoder``: the paper's MLP, sin/cos(2*pi*x) -> Linear(2,d) -> ReLU -> Linear -> ReLU -> Linear, x =
  angle / 360. ``load_official_compass`` reads the released checkpoint folder (``args.pkl`` +
  ``training_state_<step>.pth``: ``merger.model`` for the encoder, ``unet.lora`` rank-4 lora_diffusion
  weights) and converts the LoRA to PEFT for diffusers; ``compass_train`` trains one from scratch.

Angle convention: degrees, 0 = facing the viewer, 90 = facing right, 180 = facing away, 270 = facing left.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import PipelineError
from .attention import AttentionControl, KeyBias, KeyShare

BOX_SCALE = 1.2  # official: boxes enlarged x1.2 and squared before localisation
DEFAULT_BOX = (0.25, 0.25, 0.75, 0.75)  # official fallback when no box is given
PLACEHOLDER = "<compass-{}>"
ORIENTATION_PHRASES = (  # anchors every 45 degrees, clockwise seen from above, starting facing the viewer
    "facing the viewer, front view",
    "facing front right, three quarter view",
    "facing right, side view",
    "facing back right, rear three quarter view",
    "facing away, back view",
    "facing back left, rear three quarter view",
    "facing left, side view",
    "facing front left, three quarter view",
)


@dataclass
class CompassObject:
    """One object to orient: the word(s) naming it in the prompt, its angle and optional box (x0, y0, x1, y1)."""

    name: str
    angle: float
    box: tuple[float, float, float, float] | None = None


@dataclass
class CompassPrompt:
    """The prompt with compass placeholders inserted and the token positions CALL needs."""

    text: str
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (compass token position, object token position)


def parse_compass_objects(value: str | Sequence[dict[str, Any]] | None) -> list[CompassObject]:
    """Objects from JSON (``[{"name": "car", "angle": 90, "box": [0, 0.5, 0.5, 1]}]``) with clear errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise PipelineError(f"Compass objects must be JSON, e.g. [{{\"name\": \"car\", \"angle\": 90}}]: "
                                f"{error.msg} at character {error.pos}.") from None
    if not isinstance(value, list):
        raise PipelineError("Compass objects must be a JSON list of {name, angle, box} objects.")
    objects = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not str(item.get("name", "")).strip():
            raise PipelineError(f"Compass object {index + 1} needs a non-empty \"name\".")
        try:
            angle = float(item.get("angle", 0.0))
        except (TypeError, ValueError):
            raise PipelineError(f"Compass object {index + 1}: angle must be a number of degrees.") from None
        if not math.isfinite(angle):
            raise PipelineError(f"Compass object {index + 1}: angle must be finite.")
        objects.append(CompassObject(str(item["name"]).strip(), angle % 360.0, parse_box(item.get("box"), index)))
    return objects


def parse_box(box: Any, index: int) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise PipelineError(f"Compass object {index + 1}: box must be four numbers [x0, y0, x1, y1] in 0..1.") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise PipelineError(f"Compass object {index + 1}: box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1.")
    return x0, y0, x1, y1


def square_box(box: tuple[float, float, float, float], scale: float = BOX_SCALE) -> tuple[float, ...]:
    """Enlarge ``box`` by ``scale`` around its centre and make it square (side = the longer side), clipped."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * scale / 2
    return max(0.0, cx - half), max(0.0, cy - half), min(1.0, cx + half), min(1.0, cy + half)


def outside_box_mask(box: tuple[float, ...], size: int = 64) -> torch.Tensor:
    """[size, size] mask that is 1 outside ``box`` (image coordinates, y down) and 0 inside it."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x0, y0, x1, y1 = box
    inside_x = (coords >= x0) & (coords <= x1)
    inside_y = (coords >= y0) & (coords <= y1)
    outside = ~(inside_y[:, None] & inside_x[None, :])
    if outside.all():  # a box thinner than a pixel: keep the pixel holding its centre
        row, column = (min(int((v0 + v1) / 2 * size), size - 1) for v0, v1 in ((y0, y1), (x0, x1)))
        outside[row, column] = False
    return outside.float()


class AngleEncoder(Protocol):
    def __call__(self, angles_deg: torch.Tensor) -> torch.Tensor: ...


class CompassEncoder(nn.Module):
    """The paper's angle encoder: [sin 2*pi*x, cos 2*pi*x] -> 3-layer ReLU MLP -> one token embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2, width)
        self.linear2 = nn.Linear(width, width)
        self.linear3 = nn.Linear(width, width)

    def forward(self, angles_deg: torch.Tensor) -> torch.Tensor:
        turns = angles_deg.float() / 360.0
        x = torch.stack([torch.sin(2 * math.pi * turns), torch.cos(2 * math.pi * turns)], dim=-1)
        x = x.to(self.linear1.weight.dtype)
        return self.linear3(F.relu(self.linear2(F.relu(self.linear1(x)))))


class PhraseCompassEncoder:
    """Training-free: the mean input embedding of each orientation phrase, interpolated on the circle."""

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, phrases: Sequence[str] = ORIENTATION_PHRASES) -> None:
        table = text_encoder.get_input_embeddings().weight
        anchors = []
        for phrase in phrases:
            ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
            anchors.append(table[torch.tensor(ids, device=table.device)].detach().float().mean(0))
        self.anchors = torch.stack(anchors)  # [k, width], anchor i at i * 360 / k degrees

    def __call__(self, angles_deg: torch.Tensor) -> torch.Tensor:
        count = self.anchors.shape[0]
        position = (angles_deg.float().to(self.anchors.device) % 360.0) / (360.0 / count)
        low = position.floor().long() % count
        high = (low + 1) % count
        weight = (position - position.floor())[:, None]
        return (1 - weight) * self.anchors[low] + weight * self.anchors[high]


def insert_compass_tokens(prompt: str, objects: Sequence[CompassObject], tokenizer: Any) -> CompassPrompt:
    """Put ``<compass-i>`` right before the first mention of object i and find both tokens' positions."""
    text = prompt
    for index, obj in enumerate(objects):
        found = find_word(text, obj.name)
        if found < 0:
            raise PipelineError(f"Compass object '{obj.name}' does not appear in the prompt. Use a word of the prompt "
                                "as its name (e.g. 'car' for 'a red car').")
        text = f"{text[:found]}{PLACEHOLDER.format(index)} {text[found:]}"
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    pairs = []
    for index in range(len(objects)):
        compass_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER.format(index))
        if compass_id not in ids:
            raise PipelineError("The prompt is too long: a compass token fell past the text encoder's 77 tokens.")
        position = ids.index(compass_id)
        pairs.append((position, position + 1))  # the object word's first token follows its compass token
    return CompassPrompt(text, pairs)


def find_word(text: str, word: str) -> int:
    """Index of ``word`` as a whole word in ``text`` (case-insensitive), or -1."""
    import re

    match = re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE)
    return match.start() if match else -1


def ensure_placeholders(tokenizer: Any, text_encoder: nn.Module, count: int) -> list[int]:
    """Add ``count`` compass placeholder tokens (once) and grow the embedding table to hold them."""
    names = [PLACEHOLDER.format(i) for i in range(count)]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=False)
    if text_encoder.get_input_embeddings().num_embeddings < len(tokenizer):  # a tokenizer shared by two encoders
        text_encoder.resize_token_embeddings(len(tokenizer))
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


@torch.no_grad()
def write_compass_embeddings(tokenizer: Any, text_encoder: nn.Module, encoder: AngleEncoder,
                             objects: Sequence[CompassObject]) -> None:
    """Write each object's compass embedding into the input table rows of its placeholder token."""
    token_ids = ensure_placeholders(tokenizer, text_encoder, len(objects))
    table = text_encoder.get_input_embeddings().weight
    angles = torch.tensor([obj.angle for obj in objects], dtype=torch.float32)
    vectors = encoder(angles).to(device=table.device, dtype=table.dtype)
    if vectors.shape[-1] != table.shape[-1]:
        raise PipelineError(f"The compass encoder makes {vectors.shape[-1]}-d tokens but this text encoder needs "
                            f"{table.shape[-1]}-d ones: load an encoder trained for this model.")
    table[token_ids] = vectors


def localisation_biases(compass: CompassPrompt, objects: Sequence[CompassObject],
                        rows: str | slice = "cond") -> list[KeyBias]:
    """CALL: -inf on the compass and object token logits outside each object's enlarged square box."""
    biases = []
    for (compass_pos, object_pos), obj in zip(compass.pairs, objects):
        region = outside_box_mask(square_box(obj.box or DEFAULT_BOX))
        biases.append(KeyBias(tokens=[compass_pos, object_pos], value=float("-inf"), region=region, rows=rows,
                              label=f"compass:{obj.name}"))
    return biases


def key_shares(compass: CompassPrompt, rows: str | slice = "cond") -> list[KeyShare]:
    """``class2special_soft``: each compass token's key gets its object token's key added (in the conditional rows,
    unless ``rows`` names others)."""
    return [KeyShare(target=compass_pos, source=object_pos, rows=rows) for compass_pos, object_pos in compass.pairs]


def localise(control: AttentionControl, compass: CompassPrompt, objects: Sequence[CompassObject],
             rows: str | slice = "cond") -> None:
    """Register CALL (box masks) and the compass tokens' key shares on ``control``: inference and training.
    ``rows`` limits both to some batch rows: a training batch whose rows hold different prompts gives each its
    own (``microworld.compass_v2``)."""
    control.biases.extend(localisation_biases(compass, objects, rows=rows))
    control.key_shares.extend(key_shares(compass, rows))


def apply_compass(control: AttentionControl, text_stacks: Sequence[tuple[Any, nn.Module, AngleEncoder]],
                  prompt: str, objects: Sequence[CompassObject]) -> CompassPrompt:
    """Prepare one run: set the compass embeddings in every (tokenizer, text encoder) of the pipeline (SDXL has
    two), rewrite the prompt with the placeholders and register CALL and the key shares on ``control``."""
    for tokenizer, text_encoder, encoder in text_stacks:
        write_compass_embeddings(tokenizer, text_encoder, encoder, objects)
    compass = insert_compass_tokens(prompt, objects, text_stacks[0][0])
    localise(control, compass, objects)
    return compass


class RestrictedUnpickler(pickle.Unpickler):
    """``args.pkl`` holds a plain dict; refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise PipelineError(f"The compass checkpoint's args.pkl references code ({module}.{name}); "
                            "refusing to load it.")


def lora_diffusion_to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename cloneofsimo lora_diffusion keys (``x.lora_down/lora_up``) to PEFT's (``x.lora_A/lora_B``)."""
    converted = {}
    for key, tensor in state.items():
        if ".lora_down." in key:
            converted[key.replace(".lora_down.", ".lora_A.")] = tensor
        elif ".lora_up." in key:
            converted[key.replace(".lora_up.", ".lora_B.")] = tensor
    return converted


def load_official_compass(folder: str | Path, unet: nn.Module | None = None) -> CompassEncoder:
    """Load the released Compass Control checkpoint folder; with ``unet``, also attach its LoRA via PEFT."""
    folder = Path(folder)
    try:
        with open(folder / "args.pkl", "rb") as handle:
            args = RestrictedUnpickler(handle).load()
    except FileNotFoundError:
        raise PipelineError(f"No args.pkl in {folder}: point to the official '__compass' checkpoint folder.") from None
    states = sorted(folder.glob("training_state_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if not states:
        raise PipelineError(f"No training_state_<step>.pth in {folder}.")
    state = torch.load(states[-1], map_location="cpu", weights_only=True)
    encoder = CompassEncoder(int(args["merged_emb_dim"]))
    weights = {k: v for k, v in state["merger"]["model"].items() if k.startswith("linear")}
    encoder.load_state_dict(weights)
    if unet is not None and args.get("train_unet", True):
        from peft import LoraConfig

        lora = lora_diffusion_to_peft(state["unet"]["lora"])
        rank = int(args.get("lora_rank", 4))
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name="compass")
        adapter_state = {k.replace(".weight", ".compass.weight"): v for k, v in lora.items()}
        missing = unet.load_state_dict(adapter_state, strict=False).unexpected_keys
        if missing:
            raise PipelineError(f"The compass LoRA does not match this UNet ({len(missing)} unexpected keys, e.g. "
                                f"{missing[0]}); it was trained for SD 2.1.")
    return encoder.eval()


def draw_compass_preview(objects: Sequence[CompassObject], size: int = 256) -> Any:
    """Boxes (as given, and enlarged-squared as CALL uses them) with an arrow showing each object's heading."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (248, 248, 244))
    draw = ImageDraw.Draw(image)
    palette = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for index, obj in enumerate(objects):
        colour = palette[index % len(palette)]
        box = obj.box or DEFAULT_BOX
        draw.rectangle([v * size for v in square_box(box)], outline=(180, 180, 180))
        draw.rectangle([v * size for v in box], outline=colour, width=2)
        cx, cy = (box[0] + box[2]) / 2 * size, (box[1] + box[3]) / 2 * size
        radius = min(box[2] - box[0], box[3] - box[1]) * size * 0.4
        heading = math.radians(obj.angle)  # 0 = towards the viewer, drawn pointing down the image
        tip = (cx + math.sin(heading) * radius, cy + math.cos(heading) * radius)
        draw.line([(cx, cy), tip], fill=colour, width=3)
        draw.ellipse([tip[0] - 4, tip[1] - 4, tip[0] + 4, tip[1] + 4], fill=colour)
        draw.text((box[0] * size + 4, box[1] * size + 2), f"{obj.name} {obj.angle:.0f}°", fill=colour)
    return image


class CompassEncoders:
    """The image tab's compass encoders, each loaded once: the training-free phrase encoder, or an official or
    trained checkpoint folder. An official folder's rank-4 LoRA sits on the UNet (adapter "compass") and is
    switched on only for runs that use its encoder."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}
        self.loras: set[str] = set()  # official folders whose LoRA is on the UNet

    def encoder(self, choice: str, pipe: Any) -> Any:
        if choice in ("", "phrase"):
            return PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer)
        if choice not in self.loaded:
            folder = Path(choice).expanduser()
            if (folder / "compass_config.json").is_file():
                from .compass_train import load_trained_compass

                self.loaded[choice] = load_trained_compass(folder)
            elif (folder / "args.pkl").is_file():  # official release: its rank-4 UNet LoRA comes with it
                self.loaded[choice] = load_official_compass(folder, unet=pipe.unet)
                self.loras.add(choice)
            else:
                raise PipelineError(f"Compass encoder {choice!r} is neither 'phrase' nor a folder holding an official "
                                    "(args.pkl) or trained (compass_config.json) checkpoint.")
        return self.loaded[choice]

    def switch_lora(self, unet: Any, choice: str | None) -> None:
        """The official compass LoRA only for a run that uses its encoder (``choice``; None = no compass run);
        every other run sees the stock UNet."""
        if "compass" not in (getattr(unet, "peft_config", None) or {}):
            return
        if choice in self.loras:
            unet.enable_adapters()
        else:
            unet.disable_adapters()

    def apply(self, pipe: Any, request: Any, text: str, control: AttentionControl,
              info: dict[str, Any]) -> str:
        """Compass tokens into every text encoder of the pipeline and CALL on ``control``; returns the prompt text
        with the placeholders (re-parse it so the other controls' token positions account for them)."""
        objects = parse_compass_objects(request.compass)
        if request.binding:
            raise PipelineError("Compass Control and semantic binding cannot be combined yet: turn one of them off.")
        stacks = [(pipe.tokenizer, pipe.text_encoder, self.encoder(request.compass_encoder, pipe))]
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the second encoder gets the phrase encoder
            stacks.append((pipe.tokenizer_2, pipe.text_encoder_2,
                           PhraseCompassEncoder(pipe.text_encoder_2, pipe.tokenizer_2)))
        compass = apply_compass(control, stacks, text, objects)
        info.setdefault("controls", {})["compass"] = [
            {"name": o.name, "angle": o.angle, "box": list(o.box or DEFAULT_BOX), "tokens": list(pair)}
            for o, pair in zip(objects, compass.pairs)]
        return compass.text
