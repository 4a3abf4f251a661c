"""ToMe semantic binding (Hu et al., NeurIPS 2024, arXiv 2411.07132) on SD1.5, SDXL and other diffusers UNets.

Each object+attributes group becomes one composite token (noun slot = 1.1·Σnoun + 1.2·Σattributes, attribute
slots zeroed), optionally the end tokens are swapped for those of the prompt without attributes (end-token
substitution; off by default, as in the official attribute-binding config), and in the first steps two losses
refine the result:
- binding loss: MSE between ε(z, "red hat") and ε(z, composite token alone), 3 gradient steps on the token,
  with a separate anchor latent per group advanced by its own copy of the scheduler. The official step (10000 on
  a mean over SDXL's 4x128x128 latent) is scaled by the latent's size: the gradient of a mean grows as the latent
  shrinks, and unscaled the token's norm went 14 -> 300-500 on a 64 px model. Each update is also capped relative
  to the token's norm, and a step that raises the loss is undone and retried shorter;
- entropy loss: entropy of each noun's cross-attention map (on the layers of the grid a quarter of the latent
  side, the official three where the UNet has them, see ``binding_layers``), gradient steps on the latents and
  the positive text embedding until a threshold (the official one, rescaled to the grid's cell count) or an
  iteration cap. The official code runs one image; here each image of a batch has its own loss and stops on its
  own (the batch's total against a one-image threshold never stopped: micro-world v2 ran every batch to the cap),
  a step that raises an image's loss is undone and retried shorter, and each step is capped relative to the
  latent's and each token's norm, as the token step is.
Runs inside ``callback_on_step_end`` (for step i+1) and once before the loop (for step 0); the callback's
``prompt_embeds`` are ``cat([negative, positive])``, so only the positive half is edited.

Cost (issue 19; ``benchmarks/binding_passes.py`` counts it): per refined step one anchor call (its
classifier-free-guided noise advances the anchors, its conditional half is the loss target), 3 forward+backward and
one scoring forward on the tokens, each call for all groups at once (rows = groups x images: a group's loss reads
only its own token, anchor latents and target, so batching changes the number of calls, not the algorithm); per
entropy iteration one forward+backward that stops after the last recorded layer. Weights need no gradient
meanwhile. In the image tab every one of these passes is a captured CUDA graph (``FastUNet.captured``), replayed on
later requests.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attention import AttentionControl, layer_grids
from .prompts import ParsedPrompt, encode_positive, span_positions, token_positions

REFERENCE_LATENT_ELEMENTS = 4 * 128 * 128  # SDXL's latent at 1024 px, where the official token step was tuned
REFERENCE_GRID_CELLS = 32 * 32  # the official entropy thresholds are for 32x32 maps (attention_res=32)
MIN_BINDING_GRID = 8  # coarser maps leave too few cells for the entropy loss to tell two objects apart
# The official attention store (utils/ptp_utils.py register_attention_control, SDXL): 32x32 maps at 1024 px.
OFFICIAL_LAYERS = frozenset(f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2" for i in (1, 2, 3))
# A composite token's loss per image, evaluated with or without its gradient: (loss, function giving the gradient).
Evaluate = Callable[[torch.Tensor, bool], tuple[torch.Tensor, Callable[[], torch.Tensor] | None]]


def binding_grid(latent_hw: tuple[int, int], grids: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The attention grid the losses read: a quarter of the latent side (SDXL at 1024 px: 32x32, the official
    layers' grid; SD1.5 at 512 px: 16x16, Attend-and-Excite's), at least 8 a side; the UNet's nearest grid."""
    target = max(min(latent_hw) / 4, MIN_BINDING_GRID)
    return min(set(grids), key=lambda grid: (abs(math.log(min(grid) / target)), -min(grid)))


def grid_layers(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> set[str]:
    """Cross-attention layers on the binding grid, chosen by grid size (not by name, so any UNet depth and
    resolution gets the intended maps); the decoder's where it has some, as the official code reads decoder maps."""
    grids = layer_grids(unet, latent_hw)
    grid = binding_grid(latent_hw, grids.values())
    chosen = {name for name, size in grids.items() if size == grid}
    return {name for name in chosen if name.startswith("up_blocks.")} or chosen


def binding_layers(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> set[str]:
    """The layers the entropy loss reads: the grid's (``grid_layers``), or the official three where they are among
    them (SDXL's deep decoder level): the paper's maps, and the loss's UNet forward stops after the third."""
    chosen = grid_layers(unet, latent_hw)
    return set(OFFICIAL_LAYERS) if OFFICIAL_LAYERS <= chosen else chosen


def execution_order(name: str) -> tuple:
    """Sort key of a UNet layer name in the order a forward reaches it (down blocks, mid block, up blocks; inside a
    block by index). ``named_modules`` order is not it: diffusers registers ``up_blocks`` before ``mid_block``."""
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(name.split(".")[0], 3)
    return section, [int(part) for part in name.split(".") if part.isdigit()]


class _MapsRecorded(Exception):
    """Raised after the last layer the entropy loss reads: the rest of that UNet call is never needed."""


@contextmanager
def truncated_after(module: torch.nn.Module) -> Iterator[None]:
    """UNet calls inside stop (silently) once ``module`` has run: the entropy loss reads only attention maps, so the
    layers after the last recorded one add forward work and nothing to the loss or its gradients."""
    def stop(*_: Any) -> None:
        raise _MapsRecorded

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _MapsRecorded:
        pass
    finally:
        handle.remove()


@contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[None]:
    """Parameters without ``requires_grad`` while the refinement differentiates through ``module``: gradients are
    taken only for the latents and the text embedding, so autograd need not keep every layer's input for a weight
    gradient nobody asks for (same values, far less memory). The flags are restored after."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@dataclass
class BindingConfig:
    """Defaults of the official attribute-binding config (hutaiHang/ToMe configs/demo_config.py, RunConfig2,
    SDXL, 50 steps); step counts are given for 50 steps and scaled to the requested number of steps."""

    noun_scale: float = 1.1  # token_merge: 1.1 * sum(noun tokens)
    attribute_scale: float = 1.2  # ... + 1.2 * sum(attribute tokens)
    cap_composite_norm: bool = True  # ours: no composite longer than the prompt's longest token (composite_tokens)
    token_control_steps: int = 5  # tome_control_steps[0]
    attention_control_steps: int = 5  # tome_control_steps[1]
    token_refinement_steps: int = 3  # gradient steps on each composite token per denoising step
    token_step_size: float = 10000.0  # stoken -= grad(10000 * loss), on SDXL's latent; scaled to the latent size
    token_max_update: float = 0.25  # ours: no update longer than this share of the token's norm
    token_backoff: float = 0.5  # ours: a step that raised the loss is undone and retried this much shorter
    attention_refinement_steps: tuple[int, int] = (4, 4)  # cap while t/1000 > 0.9, then after
    attention_max_update: float = 0.25  # ours: per image, no latent or token moved more than this share of its norm
    attention_backoff: float = 0.5  # ours: an entropy step that raised the image's loss is undone, retried shorter
    scale_factor: float = 3.0  # entropy step = 3 * linspace(1, 0, steps)[i]; latents take half of it
    temperature: float = 0.5  # softmax over text tokens at temperature 0.5
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 26, 1: 25, 2: 24, 3: 23, 4: 22.5, 5: 22,
                                                                  6: 21.5, 7: 21, 8: 21, 9: 21})
    ets_step: int = -1  # off: RunConfig2 sets eot_replace_step=60 > 50 steps (RunConfig1, "wearing" prompts: 0)
    reference_steps: int = 50

    def scaled(self, count: int, steps: int) -> int:
        return max(1, round(count * steps / self.reference_steps)) if count > 0 else 0


@dataclass
class GroupTokens:
    phrase: str
    nouns: list[int]
    attributes: list[int]


def group_tokens(tokenizer: Any, parsed: ParsedPrompt) -> list[GroupTokens]:
    groups = []
    for group in parsed.groups:
        nouns = token_positions(tokenizer, parsed.text, group.noun.start, group.noun.end)
        attributes = span_positions(tokenizer, parsed.text, group.attributes)
        if nouns:
            groups.append(GroupTokens(group.phrase, nouns, attributes))
    return groups


def composite_tokens(embeds: torch.Tensor, groups: list[GroupTokens], config: BindingConfig) -> torch.Tensor:
    """ToMe token merge on [batch, tokens, dim] positive embeddings: the composite goes to the first noun slot.

    With ``config.cap_composite_norm`` a composite longer than the longest token of its row is shortened to that
    length: an encoder whose output ends in a layer norm (SD1.5's CLIP, micro-world v2's) gives every token about
    the same norm (micro-world v2: 15.7 for every token), the official sum is ~2x it, and such a key takes the
    cross-attention mass the start token (the attention sink) holds: on micro-world v2 the merged noun drew a third
    of all cross-attention (1 % before) and the images turned to noise. A sum within the prompt's own norms (SDXL's
    penultimate states, whose start token is far longer than any word: unverified here) is left exactly as is."""
    merged = embeds.clone()
    longest = embeds.norm(dim=-1).amax(dim=1, keepdim=True)  # [batch, 1]
    for group in groups:
        noun, extra = group.nouns[0], group.nouns[1:]
        composite = (config.noun_scale * embeds[:, group.nouns].sum(1)
                     + config.attribute_scale * embeds[:, group.attributes].sum(1))
        if config.cap_composite_norm:
            length = composite.norm(dim=-1, keepdim=True)
            composite = torch.where(length > longest, composite * (longest / length), composite)
        merged[:, noun] = composite
        merged[:, extra + group.attributes] = 0
    return merged


def end_token_substitution(embeds: torch.Tensor, merged_prompt_embeds: torch.Tensor,
                           prompt_length: int) -> torch.Tensor:
    """Positions after the prompt's own tokens (its end token and padding) come from the attribute-free prompt."""
    out = embeds.clone()
    out[:, prompt_length + 1:] = merged_prompt_embeds[:, prompt_length + 1:]
    return out


def attribute_free_prompt(parsed: ParsedPrompt, end: int | None = None) -> str:
    """The prompt (its first ``end`` characters) with every attribute word taken out."""
    end = len(parsed.text) if end is None else end
    text = parsed.text[:end]
    for span in sorted((a for g in parsed.groups for a in g.attributes if a.end <= end), key=lambda s: -s.start):
        text = text[:span.start] + text[span.end:]
    return re.sub(r"\s+", " ", text).strip()


def entropy_losses(maps: torch.Tensor, noun_positions: list[int], last: int, temperature: float) -> torch.Tensor:
    """Per image ([B]): the sum over nouns of 2x the entropy of each noun's min-max-normalised attention map
    (``maps``: [B, h, w, tokens]). The official code runs one image, so its threshold is for one image's loss."""
    text = torch.softmax(maps[..., 1:last] / temperature, dim=-1)
    nouns = torch.stack([text[..., p - 1] for p in noun_positions], dim=-1)  # no index tensor: capturable
    low = nouns.amin(dim=(1, 2), keepdim=True)
    high = nouns.amax(dim=(1, 2), keepdim=True)
    nouns = (nouns - low) / (high - low + 1e-8)
    nouns = nouns / nouns.sum(dim=(1, 2), keepdim=True)
    return -2 * (nouns * torch.log(nouns + 1e-5)).flatten(1).sum(1)


def entropy_threshold(config: BindingConfig, step: int, nouns: int, cells: int) -> float:
    """The official stopping threshold (for 32x32 maps) as the same share of the largest possible loss on a grid
    of ``cells``: the loss is 2x an entropy, which tops out at 2·ln(cells) per noun."""
    official = config.thresholds.get(step, min(config.thresholds.values())) / 2 * nouns - 2
    return official * math.log(cells) / math.log(REFERENCE_GRID_CELLS)


def capped_update(token: torch.Tensor, update: torch.Tensor, max_share: float,
                  dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """``update`` shortened to at most ``max_share`` of ``token``'s norm, the norm taken over ``dims`` (the default:
    per row of a [batch, dim] token, or per token of a [batch, tokens, dim] embedding)."""
    limit = max_share * torch.linalg.vector_norm(token, dim=dims, keepdim=True)
    length = torch.linalg.vector_norm(update, dim=dims, keepdim=True)
    return update * torch.clamp(limit / (length + 1e-12), max=1.0)


def rows_where(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the row's ``keep`` ([rows]) is true, else ``old``: a per-image choice for any tensor shape."""
    return torch.where(keep.view(-1, *[1] * (new.ndim - 1)), new, old)


class SemanticBinding:
    """Holds one generation's binding state; ``refine(step, ...)`` edits latents and the positive embedding.

    ``frames``: the latents are a video's ``[batch, channels, frames, h, w]`` and the binding belongs to these
    frames (one shot of a multi-shot video): its UNet calls give every frame the binding's own context, and the
    losses count and the latent update moves only these frames. ``passes`` counts the refinement's UNet forwards
    and backwards (``benchmarks/binding_passes.py``)."""

    def __init__(self, pipe: Any, arch: str, control: AttentionControl, parsed: ParsedPrompt, steps: int,
                 config: BindingConfig | None = None, generator: torch.Generator | None = None,
                 latent_hw: tuple[int, int] | None = None, guidance_scale: float = 7.5,
                 frames: Sequence[int] | None = None) -> None:
        self.pipe = pipe
        self.arch = arch
        self.control = control
        self.config = config or BindingConfig()
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.frames = list(frames) if frames is not None else None
        self.passes = {"forward": 0, "backward": 0}
        self.groups = group_tokens(pipe.tokenizer, parsed)
        self.prompt_length = len(pipe.tokenizer(parsed.text, add_special_tokens=False)["input_ids"])
        self.merged_prompt = attribute_free_prompt(parsed)
        self.token_steps = self.config.scaled(self.config.token_control_steps, steps)
        self.attention_steps = self.config.scaled(self.config.attention_control_steps, steps)
        self.scale_range = np.linspace(1.0, 0.0, steps)
        side = pipe.unet.config.sample_size
        self.latent_hw = latent_hw or (tuple(side) if isinstance(side, (tuple, list)) else (side, side))
        layers = binding_layers(pipe.unet, self.latent_hw)
        self.recorder = control.record(layers=layers, keep_grad=True)
        self.recorder.enabled = False
        last = max(layers, key=execution_order)
        self.last_layer = pipe.unet.get_submodule(last)
        self.grid = layer_grids(pipe.unet, self.latent_hw)[last]  # the maps' (h, w)
        self.runner: Any = None  # the tab's FastUNet, to run the refinement's UNet work on its fast path
        self.generator = generator
        self.history: list[dict[str, float | int | str | bool]] = []
        self.token_norms: list[list[float]] = [[] for _ in self.groups]  # per group: after merge, after each step
        self.anchor_embeds: list[torch.Tensor] = []
        self.anchor_latents: list[torch.Tensor] = []
        self.anchor_schedulers: list[Any] = []

    def prepare(self, positive: torch.Tensor, negative: torch.Tensor | None, latents: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
        """Composite tokens on the positive embedding; anchors and their latents for the binding loss."""
        batch = positive.shape[0]
        self.negative = negative
        self.merged_prompt_embeds = encode_positive(self.pipe, self.merged_prompt, batch)
        self.anchor_embeds = [encode_positive(self.pipe, g.phrase, batch) for g in self.groups]
        self.anchor_latents = [latents.clone() for _ in self.groups]
        self.anchor_schedulers = [copy.deepcopy(self.pipe.scheduler) for _ in self.groups]
        self.added = self._added_cond(batch, height, width, positive.dtype)
        merged = composite_tokens(positive, self.groups, self.config)
        self._log_norms(merged)
        return merged

    def _log_norms(self, positive: torch.Tensor) -> None:
        for index, group in enumerate(self.groups):
            self.token_norms[index].append(round(positive[:, group.nouns[0]].float().norm(dim=-1).mean().item(), 4))

    def summary(self) -> dict[str, Any]:
        """What the stats panel shows: each composite token's norm over the steps and the loss traces."""
        binding = {g.phrase: [round(float(h["value"]), 6) for h in self.history
                              if h["loss"] == "binding" and h["group"] == i] for i, g in enumerate(self.groups)}
        return {"binding_token_norm": {g.phrase: self.token_norms[i] for i, g in enumerate(self.groups)},
                "binding_loss_trace": binding,
                "binding_entropy_trace": [round(float(h["value"]), 4) for h in self.history if h["loss"] == "entropy"],
                "binding_entropy_iterations": self.entropy_iterations()}

    def entropy_iterations(self) -> list[int]:
        """Entropy evaluations per refined step: below the cap where every image got under the threshold."""
        steps = [h["step"] for h in self.history if h["loss"] == "entropy"]
        return [steps.count(step) for step in dict.fromkeys(steps)]

    def _added_cond(self, batch: int, height: int, width: int, dtype: torch.dtype) -> dict | None:
        if self.arch != "sdxl":
            return None
        pipe = self.pipe
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                          text_encoder_projection_dim=projection).repeat(batch, 1)
        # The official refinement passes zero pooled text embeddings (added_cond_kwargs2 in pipe_tome.py).
        return {"text_embeds": torch.zeros(batch, projection, dtype=dtype, device=pipe._execution_device),
                "time_ids": time_ids.to(pipe._execution_device)}

    def _unet(self, sample: torch.Tensor, t: Any, context: torch.Tensor, added: dict | None) -> torch.Tensor:
        """The refinement's own UNet calls: one context per image in ``sample`` (per video for a 5-D sample,
        repeated per frame as AnimateDiff's pipeline does)."""
        if sample.ndim == 5:
            context = context.repeat_interleave(sample.shape[2], dim=0)
        return self.pipe.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    def _run(self, name: str, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor],
             key: tuple = ()) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)``, through the tab's fast path when it set ``runner`` (a ``FastUNet``: captured and replayed
        as one CUDA graph, forward and backward) and directly otherwise. ``fn`` reads its tensors from ``inputs``."""
        return fn(*inputs) if self.runner is None else self.runner.captured(name, fn, inputs, key)

    def _added(self, repeat: int) -> list[torch.Tensor]:
        """SDXL's added conditions as ``_run`` inputs, for ``repeat`` times the batch."""
        return [torch.cat([v] * repeat) for v in self.added.values()] if self.added else []

    def _added_dict(self, tensors: tuple[torch.Tensor, ...]) -> dict | None:
        return dict(zip(self.added, tensors)) if self.added else None

    def _grad(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self.passes["backward"] += 1
        return torch.autograd.grad(loss, inputs)

    # What the losses and the latent update cover: everything for an image, ``frames`` for a video shot.
    def _own(self, eps: torch.Tensor) -> torch.Tensor:
        return eps if self.frames is None else eps[:, :, self.frames]

    def _own_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return maps if self.frames is None else maps[self.frames]  # one context: the attention's rows are frames

    def _own_update(self, grad: torch.Tensor) -> torch.Tensor:
        if self.frames is None:
            return grad
        mask = torch.zeros_like(grad)
        mask[:, :, self.frames] = 1
        return grad * mask

    # ---- per step ----------------------------------------------------------------------------------------
    def wants(self, step: int) -> bool:
        return step < max(self.token_steps, self.attention_steps) or step == self.config.ets_step

    def refine(self, step: int, t: Any, latents: torch.Tensor,
               positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Binding work for denoising step ``step`` (before its UNet call): ETS, token and attention refinement."""
        if step == self.config.ets_step:
            positive = end_token_substitution(positive, self.merged_prompt_embeds, self.prompt_length)
        with torch.enable_grad(), frozen_weights(self.pipe.unet):
            if step < self.token_steps:
                positive = self.refine_tokens(step, t, positive)
            if step < self.attention_steps:
                latents, positive = self.refine_attention(step, t, latents, positive)
        return latents, positive

    def refine_tokens(self, step: int, t: Any, positive: torch.Tensor) -> torch.Tensor:
        """Every group's composite token refined in one batched descent (rows = groups x images, group-major): one
        anchor call and one call per evaluation for all groups, not one each per group. Each row keeps its own
        accept/back-off, so the tokens are the ones refining each group alone gives (up to rounding)."""
        positive = positive.clone()
        if not self.groups:
            return positive
        count = len(self.groups)
        with self.control.scope(recorders=[], biases=[], cfg=False):
            anchor_latents = [latents.detach() for latents in self.anchor_latents]
            with torch.no_grad():
                noise, anchor = self._anchor_noise(t, anchor_latents)
            target = self._own(anchor).float()
            evaluate = self._token_loss(t, torch.cat(anchor_latents), target, positive.dtype)
            tokens = torch.cat([positive[:, group.nouns[0]] for group in self.groups]).detach().float()
            records = [{"step": step, "loss": "binding", "group": index} for index in range(count)]
            tokens = self.descend_with(tokens, evaluate, target[0].numel(), records)
            extra = self.pipe.prepare_extra_step_kwargs(self.generator, 0.0)
            per_group = zip(self.groups, tokens.chunk(count), noise.chunk(count), self.anchor_schedulers,
                            anchor_latents)
            for index, (group, token, own_noise, scheduler, latents) in enumerate(per_group):
                positive[:, group.nouns[0]] = token.to(positive.dtype)
                self.anchor_latents[index] = scheduler.step(own_noise, t, latents, **extra, return_dict=False)[0]
        self._log_norms(positive)
        return positive

    def _token_loss(self, t: Any, anchor_latents: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> Evaluate:
        """The binding loss of the composite tokens (MSE between ε(z, token alone) and ``target``, per row: one row
        per group and image, each with its own token as its whole context) as an ``Evaluate`` for ``descend_with``."""
        inputs = [self.pipe.scheduler.scale_model_input(anchor_latents, t), torch.as_tensor(t), target,
                  *self._added(len(self.groups))]

        def loss(token: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                 *added: torch.Tensor) -> torch.Tensor:
            predicted = self._own(self._unet(sample, t, token[:, None, :].to(dtype), self._added_dict(added)))
            return (predicted.float() - target).pow(2).flatten(1).mean(1)  # per image, as the official mean

        if self.runner is None:
            return self._autograd_evaluate(lambda token: loss(token, *inputs))

        def loss_and_grad(token: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            candidate = token.detach().requires_grad_(True)
            value = loss(candidate, *rest)
            return value.detach(), torch.autograd.grad(value.sum(), [candidate])[0]

        def evaluate(token: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
            self.passes["forward"] += 1
            self.passes["backward"] += gradient
            if not gradient:
                with torch.no_grad():
                    return self._run("binding-token", lambda *a: (loss(*a),), [token, *inputs], (str(dtype),))[0], None
            value, grad = self._run("binding-token-grad", loss_and_grad, [token, *inputs], (str(dtype),))
            return value, lambda: grad
        return evaluate

    def _autograd_evaluate(self, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Evaluate:
        """``loss_of`` as an ``Evaluate``: the gradient is taken only if asked for (a rejected proposal needs none)."""
        def evaluate(token: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
            self.passes["forward"] += 1
            candidate = token.detach().requires_grad_(gradient)
            with torch.set_grad_enabled(gradient):
                loss = loss_of(candidate)
            return loss.detach(), lambda: self._grad(loss.sum(), [candidate])[0]
        return evaluate

    def descend(self, token: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor], elements: int,
                record: dict[str, Any]) -> torch.Tensor:
        """``descend_with`` on a differentiable per-row loss function."""
        return self.descend_with(token, self._autograd_evaluate(loss_of), elements, [record])

    def descend_with(self, token: torch.Tensor, evaluate: Evaluate, elements: int,
                     records: Sequence[dict[str, Any]]) -> torch.Tensor:
        """``token_refinement_steps`` gradient steps on ``token`` ([rows, dim]) against the per-row loss that
        ``evaluate(token, with_gradient)`` returns (with a function giving its gradient). The rows are split evenly
        among ``records`` (groups refined together), each logged in ``history`` on its own; ``elements`` is one
        row's latent size.

        The step is the official one scaled by ``elements / REFERENCE_LATENT_ELEMENTS`` and capped per row at
        ``token_max_update`` of the token's norm. Each proposal is scored by the next evaluation (the last by one
        extra forward pass without gradients); a row whose loss rose goes back to its last accepted token and
        retries with the step times ``token_backoff``, so the returned token never scores worse than the input."""
        config = self.config
        if config.token_refinement_steps <= 0:
            return token
        size = config.token_step_size * elements / REFERENCE_LATENT_ELEMENTS
        best, best_loss, best_grad = token, None, torch.zeros_like(token)
        scale = torch.ones(token.shape[0], 1, device=token.device)
        for iteration in range(config.token_refinement_steps + 1):
            last = iteration == config.token_refinement_steps
            candidate = token.detach()
            loss, gradient = evaluate(candidate, not last)
            accepted = torch.ones_like(loss, dtype=torch.bool) if best_loss is None else loss <= best_loss
            self._record(records, iteration, loss, accepted)
            fresh = not last and bool(accepted.any())  # a rejected row keeps the gradient of its accepted token
            grad = gradient() if fresh else best_grad
            keep = accepted[:, None]
            best = torch.where(keep, candidate, best)
            best_loss = torch.where(accepted, loss, best_loss) if best_loss is not None else loss
            best_grad = torch.where(keep, grad, best_grad)
            scale = torch.where(keep, scale, scale * config.token_backoff)
            if not last:
                token = best - capped_update(best, scale * size * best_grad, config.token_max_update)
        return best

    def _record(self, records: Sequence[dict[str, Any]], iteration: int, loss: torch.Tensor,
                accepted: torch.Tensor) -> None:
        """One ``history`` entry per record: the mean loss of its rows and whether every one of them was accepted."""
        values = loss.reshape(len(records), -1).mean(1).tolist()
        kept = accepted.reshape(len(records), -1).all(1).tolist()
        self.history += [{**record, "iteration": iteration, "value": value, "accepted": ok}
                         for record, value, ok in zip(records, values, kept)]

    def _anchor_noise(self, t: Any, latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One call for every group's anchor trajectory (``latents``: one per group, scaled by its own scheduler
        copy): the classifier-free-guided noise of each anchor's next step and its conditional prediction, which is
        also the binding loss's target (ε(z, anchor)); both group-major, one chunk per group. With guidance the
        call's rows are every group's unconditional ones, then every group's conditional ones."""
        guided = self.negative is not None
        sample = torch.cat([scheduler.scale_model_input(own, t)
                            for scheduler, own in zip(self.anchor_schedulers, latents)])
        context = torch.cat(self.anchor_embeds)
        if guided:
            sample = torch.cat([sample, sample])
            context = torch.cat([self.negative] * len(latents) + [context])

        def predict(sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    *added: torch.Tensor) -> tuple[torch.Tensor]:
            return (self._unet(sample, t, context, self._added_dict(added)),)

        self.passes["forward"] += 1
        noise = self._run("binding-anchor", predict,
                          [sample, torch.as_tensor(t), context, *self._added(len(latents) * (1 + guided))])[0]
        if not guided:
            return noise, noise
        uncond, cond = noise.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond), cond

    def refine_attention(self, step: int, t: Any, latents: torch.Tensor, positive: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official iterate-until-threshold entropy refinement, per image: each image stops once its own loss is
        under the threshold (the official code runs one image; the batch's total never got under a one-image
        threshold, so every batch ran to the cap). ``_descend_entropy`` keeps only steps that lower the loss."""
        config = self.config
        train_steps = self.pipe.scheduler.config.num_train_timesteps
        caps = config.attention_refinement_steps
        cap = caps[0] if float(t) / train_steps > 0.9 else caps[1]
        size = config.scale_factor * float(self.scale_range[step])
        threshold = entropy_threshold(config, step, len(self.groups), self.grid[0] * self.grid[1])
        self.recorder.enabled = True
        try:
            with self.control.scope(recorders=[self.recorder], cfg=False):
                latents, positive = self._descend_entropy(step, t, latents.detach(), positive.detach(), cap, size,
                                                          threshold)
        finally:
            self.recorder.enabled = False
            self.recorder.clear()
        return latents.detach(), positive.detach()

    def _descend_entropy(self, step: int, t: Any, latents: torch.Tensor, positive: torch.Tensor, cap: int,
                         size: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``cap`` evaluations (one forward+backward each, as the official iterations) of the per-image
        entropy loss. Each image keeps its lowest-loss state: a step that raised its loss is undone and the next one
        is ``attention_backoff`` times shorter (as the token step), so the result never scores worse than the input;
        an image under ``threshold`` takes no more steps, and the loop ends when every image is. The official step
        (``size`` on the text, half of it on the latents) is capped per image at ``attention_max_update`` of the
        latent's norm and of each token's norm (the zeroed attribute slots of a composite stay zero)."""
        config = self.config
        rows = positive.shape[0]
        best, best_loss, grads = (latents, positive), None, (torch.zeros_like(latents), torch.zeros_like(positive))
        scale = torch.ones(rows, device=positive.device)
        candidate = best
        for iteration in range(cap):
            loss, grad_latents, grad_text = self._entropy_gradients(t, *(x.detach() for x in candidate))
            loss = loss.float().reshape(rows, -1).mean(1)  # per image (a video shot: the mean over its frames)
            accepted = torch.ones_like(loss, dtype=torch.bool) if best_loss is None else loss <= best_loss
            best = tuple(rows_where(accepted, new, old) for new, old in zip(candidate, best))
            grads = tuple(rows_where(accepted, new, old) for new, old in zip((grad_latents, grad_text), grads))
            best_loss = loss if best_loss is None else torch.where(accepted, loss, best_loss)
            scale = torch.where(accepted, scale, scale * config.attention_backoff)
            active = best_loss >= threshold
            self.history.append({"step": step, "loss": "entropy", "iteration": iteration,
                                 "value": loss.mean().item(), "accepted": bool(accepted.all()),
                                 "under_threshold": int((~active).sum())})
            if not active.any():
                break
            rate = size * scale * active  # an image under the threshold stays where it is
            latent_step = 0.5 * rate.view(-1, *[1] * (latents.ndim - 1)) * self._own_update(grads[0])
            text_step = rate.view(-1, 1, 1) * grads[1]
            latent_step = capped_update(best[0], latent_step, config.attention_max_update,
                                        tuple(range(1, latents.ndim)))
            text_step = capped_update(best[1], text_step, config.attention_max_update)
            candidate = (best[0] - latent_step.to(latents.dtype), best[1] - text_step.to(positive.dtype))
        return best

    def _entropy_gradients(self, t: Any, latents: torch.Tensor, positive: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entropy loss of each image (``entropy_losses``) at (``latents``, ``positive``) and the gradients of
        their total for both. The UNet stops after the last
        recorded layer; ``scale_model_input`` stays outside the (captured) work, as its factor depends on the step,
        and the latents' gradient goes back through it by autograd, as before."""
        nouns, last, temperature = [g.nouns[0] for g in self.groups], self.prompt_length + 1, self.config.temperature
        leaf = latents.requires_grad_(True)
        sample = self.pipe.scheduler.scale_model_input(leaf, t)

        def gradients(sample: torch.Tensor, t: torch.Tensor, positive: torch.Tensor, *added: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            sample, positive = sample.detach().requires_grad_(True), positive.detach().requires_grad_(True)
            self.recorder.clear()
            with truncated_after(self.last_layer):
                self._unet(sample, t, positive, self._added_dict(added))
            losses = entropy_losses(self._own_maps(self.recorder.aggregate()), nouns, last, temperature)
            self.recorder.clear()
            return (losses.detach(), *torch.autograd.grad(losses.sum(), [sample, positive]))

        self.passes["forward"] += 1
        self.passes["backward"] += 1
        loss, grad_sample, grad_text = self._run("binding-entropy", gradients,
                                                 [sample.detach(), torch.as_tensor(t), positive, *self._added(1)],
                                                 (tuple(sorted(self.recorder.layers)), tuple(nouns), last, temperature))
        grad_latents = grad_sample if sample is leaf else torch.autograd.grad(sample, leaf, grad_sample)[0]
        return loss, grad_latents, grad_text
