"""The control plan: the token controls a request asks for, read and validated once, applied by the image tab to
its prompt and by the video tab to each shot's prompt.

Defaults come from each technique's config dataclass (``LPAConfig``, ``BindingConfig``); the requests only
carry what a user changed. What differs between the tabs is where a control acts (an image's rows, a shot's
frames), not how it is set up: a prompt that does not name an isolated item is an error for an image and a
shot that does not need it for a video; a prompt without a style is an error for an image and a skipped shot for
a video. The image tab's own wiring (its prompt encoding, ToMe's start and per-step refinement) is here too; the
video tab's is ``shot_controls.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..base import PipelineError
from .attention import AttentionControl
from .binding import BindingConfig, GroupTokens, SemanticBinding
from .leakfix import isolate_items
from .lpa import LPAConfig, causal_keys, route_style_tokens
from .prompts import ParsedPrompt, content_words, find_words, span_positions, token_positions


def split_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def check_window(window: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in window)
    if not 0 <= low <= high <= 1000:
        raise PipelineError(f"LPA window must satisfy 0 <= start <= end <= 1000, got {tuple(window)}.")
    return low, high


def binding_report(groups: list[GroupTokens]) -> list[dict[str, Any]]:
    """What the output's metadata says about each bound group."""
    return [{"phrase": g.phrase, "nouns": g.nouns, "attributes": g.attributes} for g in groups]


@dataclass(frozen=True)
class ControlPlan:
    binding: BindingConfig | None = None  # ToMe semantic binding; None = off
    lpa: LPAConfig | None = None  # Local Prompt Adaptation; None = off
    isolate: tuple[str, ...] = ()  # Follow-the-Flow leakage fix: items re-encoded alone

    @classmethod
    def from_request(cls, request: Any) -> "ControlPlan":
        """From an ``ImageRequest`` or a ``VideoRequest`` (fields ``binding``, ``lpa``, ``lpa_window``,
        ``isolate``, and ``ets_step`` where the tab has it)."""
        window = check_window(request.lpa_window)
        binding = None
        if request.binding:
            binding = BindingConfig()
            binding = replace(binding, ets_step=int(getattr(request, "ets_step", binding.ets_step)))
        return cls(binding=binding, lpa=LPAConfig(window=window) if request.lpa else None,
                   isolate=tuple(split_words(request.isolate)))

    @property
    def active(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate)

    def isolated(self, pipe: Any, text: str, positive: torch.Tensor, strict: bool = True
                 ) -> tuple[torch.Tensor, dict[str, list[int]] | None]:
        """``positive`` with the isolated items that ``text`` names re-encoded alone, and where they are (None when
        none applies). ``strict``: an item missing from ``text`` is an error."""
        items = list(self.isolate) if strict else [i for i in self.isolate if find_words(text, i) is not None]
        if not items:
            return positive, None
        return isolate_items(pipe, text, items, positive)

    def route_lpa(self, control: AttentionControl, tokenizer: Any, parsed: ParsedPrompt,
                  rows: slice | None = None) -> dict[str, Any] | None:
        """LPA's biases for ``parsed``'s content and style tokens on ``control`` (on batch ``rows`` if given, else
        the conditional half); the report, or None when the prompt has no style to route."""
        if self.lpa is None or parsed.style is None:
            return None
        content = span_positions(tokenizer, parsed.text, content_words(parsed))
        style = token_positions(tokenizer, parsed.text, parsed.style.start, parsed.style.end)
        content, style = causal_keys(content, style, tokenizer, parsed.text, self.lpa)
        for bias in route_style_tokens(control.layers, content, style, self.lpa):
            if rows is not None:
                bias.rows = rows
            control.biases.append(bias)
        return {"content_tokens": content, "style_tokens": style, "style": parsed.style.text}


def encode_controlled(pipe: Any, arch: str, request: Any, parsed: ParsedPrompt, control: AttentionControl,
                      call: dict[str, Any], info: dict[str, Any], latent_hw: tuple[int, int]) -> SemanticBinding | None:
    """The image tab's controlled run: encode the prompt ourselves into ``call`` with the embedding-level controls
    applied, set up the attention-level ones on ``control``; the binding to refine, if any."""
    batch, cfg = int(request.batch_size), float(request.cfg) > 1.0
    device, negative = pipe._execution_device, request.negative_prompt or None
    if arch == "sdxl":
        positive, neg, pooled, neg_pooled = pipe.encode_prompt(
            parsed.text, parsed.text, device=device, num_images_per_prompt=batch,
            do_classifier_free_guidance=cfg, negative_prompt=negative, negative_prompt_2=negative)
        call.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
    else:
        positive, neg = pipe.encode_prompt(parsed.text, device, batch, cfg, negative_prompt=negative)
    plan = ControlPlan.from_request(request)
    controls: dict[str, Any] = {}
    positive, where = plan.isolated(pipe, parsed.text, positive)
    if where is not None:
        controls["isolated"] = where
    if plan.lpa is not None:
        controls["lpa"] = plan.route_lpa(control, pipe.tokenizer, parsed)
        if controls["lpa"] is None:
            raise PipelineError("LPA needs a style: write '... in watercolor style' in the prompt or fill the "
                                "Style field.")
    binding = None
    if plan.binding is not None:
        if not parsed.groups:
            raise PipelineError("Semantic binding found no object+attribute groups. Mark them like "
                                "'a [red hat] and a [blue car]'.")
        binding = SemanticBinding(pipe, arch, control, parsed, int(request.steps), plan.binding,
                                  generator=torch.Generator("cpu").manual_seed(request.seed),
                                  latent_hw=latent_hw, guidance_scale=float(request.cfg))
        controls["binding"] = binding_report(binding.groups)
    # The embeddings already hold one row per image: diffusers would repeat them num_images_per_prompt times
    # again (batch x batch rows for `batch` generators). Image i still gets the noise of seed + i.
    call.update(prompt_embeds=positive, negative_prompt_embeds=neg, num_images_per_prompt=1)
    info.setdefault("controls", {}).update(controls)
    return binding


def start_binding(pipe: Any, binding: SemanticBinding, call: dict[str, Any], generators: list[torch.Generator]) -> None:
    """Composite tokens, then the step-0 refinement on our own initial noise (the loop starts at step 1's
    callback). The noise is drawn exactly as ``prepare_latents`` would, so seeds keep their meaning."""
    from diffusers.utils.torch_utils import randn_tensor

    positive, negative = call["prompt_embeds"], call["negative_prompt_embeds"]
    steps, height, width = call["num_inference_steps"], call["height"], call["width"]
    scale = pipe.vae_scale_factor
    shape = (positive.shape[0], pipe.unet.config.in_channels, height // scale, width // scale)
    noise = randn_tensor(shape, generator=generators, device=pipe._execution_device, dtype=positive.dtype)
    pipe.scheduler.set_timesteps(steps, device=pipe._execution_device)
    latents = noise * pipe.scheduler.init_noise_sigma
    positive = binding.prepare(positive, negative if call["guidance_scale"] > 1 else None, latents, height, width)
    latents, positive = binding.refine(0, pipe.scheduler.timesteps[0], latents, positive)
    call.update(latents=latents / pipe.scheduler.init_noise_sigma, prompt_embeds=positive)


def refine_embeds(pipe: Any, binding: SemanticBinding) -> Any:
    """ToMe's refinement in the form the shared step callback takes (diffusion/loop.py): the latents and the
    positive half of ``prompt_embeds`` (all of it when ``pipe`` runs without classifier-free guidance)."""

    def refine(step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not binding.wants(step):
            return {}
        embeds = tensors["prompt_embeds"]
        half = embeds.shape[0] // 2 if pipe.do_classifier_free_guidance else 0
        latents, positive = binding.refine(step, timestep, tensors["latents"], embeds[half:])
        return {"latents": latents, "prompt_embeds": torch.cat([embeds[:half], positive])}

    return refine
