"""ToMe semantic binding (Hu et al., NeurIPS 2024, arXiv 2411.07132) on SD1.5 and SDXL.

Each object+attributes group becomes one composite token (noun slot = 1.1·Σnoun + 1.2·Σattributes, attribute
slots zeroed), the end tokens are swapped for those of the prompt without attributes (end-token substitution),
and in the first steps two losses refine the result:
- binding loss: MSE between ε(z, "red hat") and ε(z, composite token alone), 3 gradient steps on the token,
  with a separate anchor latent per group advanced by its own copy of the scheduler;
- entropy loss: entropy of each noun's cross-attention map (stored on the paper's layers), gradient steps on
  the latents and the positive text embedding until a threshold or an iteration cap.
Runs inside ``callback_on_step_end`` (for step i+1) and once before the loop (for step 0); the callback's
``prompt_embeds`` are ``cat([negative, positive])``, so only the positive half is edited.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attention import AttentionControl
from .prompts import ParsedPrompt, encode_positive, span_positions, token_positions

# Official SDXL layers: up_blocks.0.attentions.1.transformer_blocks.{1,2,3} (32x32 maps at 1024 px).
SDXL_BINDING_LAYERS = tuple(f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2" for i in (1, 2, 3))
# SD1.5 equivalent: the 16x16 cross-attention layers at 512 px (a quarter of the latent side), as Attend-and-Excite.
SD15_BINDING_PREFIXES = ("down_blocks.2.attentions.", "up_blocks.1.attentions.")


def binding_layers(arch: str) -> Any:
    if arch == "sdxl":
        return set(SDXL_BINDING_LAYERS)
    return lambda name: name.startswith(SD15_BINDING_PREFIXES)


@dataclass
class BindingConfig:
    """Defaults of the official attribute-binding config (hutaiHang/ToMe configs/demo_config.py, RunConfig2,
    SDXL, 50 steps); step counts are given for 50 steps and scaled to the requested number of steps."""

    noun_scale: float = 1.1  # token_merge: 1.1 * sum(noun tokens)
    attribute_scale: float = 1.2  # ... + 1.2 * sum(attribute tokens)
    token_control_steps: int = 5  # tome_control_steps[0]
    attention_control_steps: int = 5  # tome_control_steps[1]
    token_refinement_steps: int = 3  # gradient steps on each composite token per denoising step
    token_step_size: float = 10000.0  # stoken -= grad(10000 * loss)
    attention_refinement_steps: tuple[int, int] = (4, 4)  # cap while t/1000 > 0.9, then after
    scale_factor: float = 3.0  # entropy step = 3 * linspace(1, 0, steps)[i]; latents take half of it
    temperature: float = 0.5  # softmax over text tokens at temperature 0.5
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 26, 1: 25, 2: 24, 3: 23, 4: 22.5, 5: 22,
                                                                  6: 21.5, 7: 21, 8: 21, 9: 21})
    ets_step: int = 0  # RunConfig1 substitutes at step 0; a negative value turns it off
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
    """ToMe token merge on [batch, tokens, dim] positive embeddings: the composite goes to the first noun slot."""
    merged = embeds.clone()
    for group in groups:
        noun, extra = group.nouns[0], group.nouns[1:]
        merged[:, noun] = (config.noun_scale * embeds[:, group.nouns].sum(1)
                           + config.attribute_scale * embeds[:, group.attributes].sum(1))
        merged[:, extra + group.attributes] = 0
    return merged


def end_token_substitution(embeds: torch.Tensor, merged_prompt_embeds: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Positions after the prompt's own tokens (its end token and padding) come from the attribute-free prompt."""
    out = embeds.clone()
    out[:, prompt_length + 1:] = merged_prompt_embeds[:, prompt_length + 1:]
    return out


def attribute_free_prompt(parsed: ParsedPrompt) -> str:
    text = parsed.text
    for span in sorted((a for g in parsed.groups for a in g.attributes), key=lambda s: -s.start):
        text = text[:span.start] + text[span.end:]
    return re.sub(r"\s+", " ", text).strip()


def entropy_loss(maps: torch.Tensor, noun_positions: list[int], last: int, temperature: float) -> torch.Tensor:
    """Sum over nouns of 2x the entropy of each noun's min-max-normalised attention map ([B, h, w, tokens])."""
    text = torch.softmax(maps[..., 1:last] / temperature, dim=-1)
    nouns = text[..., [p - 1 for p in noun_positions]]
    low = nouns.amin(dim=(1, 2), keepdim=True)
    high = nouns.amax(dim=(1, 2), keepdim=True)
    nouns = (nouns - low) / (high - low + 1e-8)
    nouns = nouns / nouns.sum(dim=(1, 2), keepdim=True)
    return -2 * (nouns * torch.log(nouns + 1e-5)).sum()


class SemanticBinding:
    """Holds one generation's binding state; ``refine(step, ...)`` edits latents and the positive embedding."""

    def __init__(self, pipe: Any, arch: str, control: AttentionControl, parsed: ParsedPrompt, steps: int,
                 config: BindingConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.pipe = pipe
        self.arch = arch
        self.control = control
        self.config = config or BindingConfig()
        self.steps = steps
        self.groups = group_tokens(pipe.tokenizer, parsed)
        self.prompt_length = len(pipe.tokenizer(parsed.text, add_special_tokens=False)["input_ids"])
        self.merged_prompt = attribute_free_prompt(parsed)
        self.token_steps = self.config.scaled(self.config.token_control_steps, steps)
        self.attention_steps = self.config.scaled(self.config.attention_control_steps, steps)
        self.scale_range = np.linspace(1.0, 0.0, steps)
        self.recorder = control.record(layers=binding_layers(arch), keep_grad=True)
        self.recorder.enabled = False
        self.generator = generator
        self.history: list[dict[str, float | int | str]] = []
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
        return composite_tokens(positive, self.groups, self.config)

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

    def _eps(self, latents: torch.Tensor, t: Any, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet(self.pipe.scheduler.scale_model_input(latents, t), t, embeds, self.added)

    def _unet(self, sample: torch.Tensor, t: Any, context: torch.Tensor, added: dict | None) -> torch.Tensor:
        """The refinement's own UNet calls (one context per image in ``sample``)."""
        return self.pipe.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]

    # What the losses and the latent update cover: everything for an image; a video shot narrows them to its frames.
    def _own(self, eps: torch.Tensor) -> torch.Tensor:
        return eps

    def _own_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return maps

    def _own_update(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    # ---- per step ----------------------------------------------------------------------------------------
    def wants(self, step: int) -> bool:
        return step < max(self.token_steps, self.attention_steps) or step == self.config.ets_step

    def refine(self, step: int, t: Any, latents: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Binding work for denoising step ``step`` (before its UNet call): ETS, token and attention refinement."""
        if step == self.config.ets_step:
            positive = end_token_substitution(positive, self.merged_prompt_embeds, self.prompt_length)
        with torch.enable_grad():
            if step < self.token_steps:
                positive = self.refine_tokens(step, t, positive)
            if step < self.attention_steps:
                latents, positive = self.refine_attention(step, t, latents, positive)
        return latents, positive

    def refine_tokens(self, step: int, t: Any, positive: torch.Tensor) -> torch.Tensor:
        positive = positive.clone()
        config = self.config
        with self.control.scope(recorders=[], biases=[], cfg=False):
            for index, group in enumerate(self.groups):
                anchor_latents = self.anchor_latents[index].detach()
                with torch.no_grad():
                    target = self._eps(anchor_latents, t, self.anchor_embeds[index])
                token = positive[:, group.nouns[0]].detach().clone()
                for iteration in range(config.token_refinement_steps):
                    token.requires_grad_(True)
                    predicted = self._own(self._eps(anchor_latents, t, token[:, None, :]))
                    loss = torch.nn.functional.mse_loss(predicted.float(), self._own(target).float(),
                                                        reduction="sum") / self._own(target)[0].numel()
                    grad = torch.autograd.grad(loss * config.token_step_size, [token])[0]
                    token = (token - grad).detach()
                    self.history.append({"step": step, "loss": "binding", "group": index, "iteration": iteration,
                                         "value": loss.item()})
                positive[:, group.nouns[0]] = token.to(positive.dtype)
                with torch.no_grad():
                    self.anchor_latents[index] = self._advance_anchor(index, t, anchor_latents)
        return positive

    def _advance_anchor(self, index: int, t: Any, latents: torch.Tensor) -> torch.Tensor:
        """One classifier-free-guided step of the anchor prompt's own trajectory, on its own scheduler copy."""
        scheduler = self.anchor_schedulers[index]
        if self.negative is None:
            noise = self._unet(scheduler.scale_model_input(latents, t), t, self.anchor_embeds[index], self.added)
        else:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            embeds = torch.cat([self.negative, self.anchor_embeds[index]])
            added = None if self.added is None else {k: torch.cat([v, v]) for k, v in self.added.items()}
            uncond, cond = self._unet(model_input, t, embeds, added).chunk(2)
            noise = uncond + self.pipe.guidance_scale * (cond - uncond)
        extra = self.pipe.prepare_extra_step_kwargs(self.generator, 0.0)
        return scheduler.step(noise, t, latents, **extra, return_dict=False)[0]

    def refine_attention(self, step: int, t: Any, latents: torch.Tensor, positive: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        nouns = [g.nouns[0] for g in self.groups]
        threshold = config.thresholds.get(step, min(config.thresholds.values())) / 2 * len(nouns) - 2
        train_steps = self.pipe.scheduler.config.num_train_timesteps
        caps = config.attention_refinement_steps
        cap = caps[0] if float(t) / train_steps > 0.9 else caps[1]
        step_size = config.scale_factor * float(self.scale_range[step])
        self.recorder.enabled = True
        try:
            with self.control.scope(recorders=[self.recorder], cfg=False):
                for iteration in range(cap):
                    latents = latents.detach().requires_grad_(True)
                    positive = positive.detach().requires_grad_(True)
                    self.recorder.clear()
                    self._eps(latents, t, positive)
                    loss = entropy_loss(self._own_maps(self.recorder.aggregate()), nouns, self.prompt_length + 1,
                                        config.temperature)
                    self.history.append({"step": step, "loss": "entropy", "iteration": iteration, "value": loss.item()})
                    grad_latents, grad_text = torch.autograd.grad(loss, [latents, positive])
                    latents = latents - 0.5 * step_size * self._own_update(grad_latents)
                    positive = positive - step_size * grad_text
                    if loss.item() < threshold:
                        break
        finally:
            self.recorder.enabled = False
            self.recorder.clear()
        return latents.detach(), positive.detach()
