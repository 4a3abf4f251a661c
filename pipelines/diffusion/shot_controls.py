"""The image tab's token controls on a video, shot by shot (``ShotControls``).

The controls themselves (binding, LPA, leakage fix) are the image tab's, read once into a ``ControlPlan``
(diffusion/controls.py); this module says where each shot's controls act: on its own frames of AnimateDiff's
spatial cross-attention.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .attention import AttentionControl
from .binding import SemanticBinding, attribute_free_prompt, composite_tokens, end_token_substitution, group_tokens
from .controls import binding_report
from .prompts import ParsedPrompt, encode_positive

if TYPE_CHECKING:
    from ..tabs.video import Plan


class ShotControls:
    """The image tab's token controls applied shot by shot on AnimateDiff's spatial cross-attention.

    Text reaches a video frame only through the spatial ``attn2`` layers (motion modules have no text), with
    one context per frame. So each shot's controls act on its own frames:

    - embedding-level (leakage fix; ToMe composite tokens and end-token substitution) edit each shot's
      positive embedding; a UNet pre-hook writes the per-frame mix of the edited embeddings (the timeline's
      ``frame_mix``, the same weights FreeNoise interpolates) into the conditional half of the context;
    - LPA's -inf key biases carry the shot's own token positions and cover only the shot's frames (its rows
      of the conditional half); frames inside a smooth transition mix two prompts and are left unbiased;
    - ToMe's refinement (``SemanticBinding`` with the shot's ``frames``) runs the image tab's binding and entropy
      losses on the whole video (the motion modules need every frame) with the shot's own single context, counting
      only the shot's frames, and moves only their latents; the image tab's losses, steps and layers (chosen by
      grid size, as for an image of the video's frame size).
    """

    def __init__(self, pipe, plan: Plan) -> None:
        self.pipe = pipe
        self.plan = plan.controls
        self.frames = plan.num_frames
        self.cfg = plan.guidance_scale > 1.0
        self.attention = AttentionControl(pipe.unet)
        self.report: list[dict[str, Any]] = []
        self.mix = plan.timeline.frame_mix(plan.num_frames)
        self.size = (plan.height, plan.width)
        self.latent_hw = (plan.height // pipe.vae_scale_factor, plan.width // pipe.vae_scale_factor)
        self.guidance = plan.guidance_scale
        self.edited: list[torch.Tensor] = []
        self.bindings: dict[int, SemanticBinding] = {}
        for index, parsed in enumerate(plan.parsed):
            own = [frame for frame, weights in enumerate(self.mix) if weights == {index: 1.0}]
            refined = self.plan.binding is not None and bool(own) and bool(group_tokens(pipe.tokenizer, parsed))
            positive, report = self.edit_shot(parsed, refined)
            self.edited.append(positive)
            if refined:
                self.bindings[index] = SemanticBinding(
                    pipe, "sd15", self.attention, parsed, plan.steps, latent_hw=self.latent_hw,
                    guidance_scale=self.guidance, frames=own)
            if self.plan.lpa is not None and own:
                report["lpa"] = self.route(parsed, own)
            self.report.append({"shot": index + 1, **report})
        self.negative = (encode_positive(pipe, plan.negative_prompt, 1) if self.bindings and self.cfg
                         else None)
        self.per_frame = self.mixed() if self.plan.binding is not None or self.plan.isolate else None
        self.refining = False  # while a shot's binding runs its own UNet calls (one context for every frame)
        self._hook = None

    def mixed(self) -> torch.Tensor:
        """Each frame's conditional context: the timeline's mix of the shots' edited embeddings."""
        return torch.cat([sum(weight * self.edited[shot] for shot, weight in weights.items())
                          for weights in self.mix])

    def start(self, pipe, arguments: dict[str, Any]) -> torch.Tensor:
        """Initial latents drawn exactly as the pipeline would (FreeNoise shuffling included), with the bound
        shots' composite tokens prepared and ToMe's step-0 refinement applied; pass them as ``latents=``."""
        device = pipe._execution_device
        pipe.scheduler.set_timesteps(arguments["num_inference_steps"], device=device)
        height, width = self.size
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, self.frames, height, width,
                                       self.edited[0].dtype, device, arguments["generator"])
        for index, binding in self.bindings.items():
            self.edited[index] = binding.prepare(self.edited[index], self.negative, latents, height, width)
        latents = self.refine(0, pipe.scheduler.timesteps[0], latents)
        self.per_frame.copy_(self.mixed())
        return latents / pipe.scheduler.init_noise_sigma

    def refine(self, step: int, timestep: Any, latents: torch.Tensor) -> torch.Tensor:
        """ToMe's work for ``step`` on every bound shot; the per-frame context is updated in place (a captured
        UNet graph reads it by address)."""
        wanted = [index for index, binding in self.bindings.items() if binding.wants(step)]
        self.refining = True
        try:
            for index in wanted:
                latents, self.edited[index] = self.bindings[index].refine(step, timestep, latents, self.edited[index])
        finally:
            self.refining = False
        if wanted:
            self.per_frame.copy_(self.mixed())
        return latents

    def refine_step(self, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``refine`` in the form the shared step callback takes (diffusion/loop.py)."""
        return {"latents": self.refine(step, timestep, tensors["latents"])}

    def refinement_iterations(self) -> int:
        return sum(len(binding.history) for binding in self.bindings.values())

    def edit_shot(self, parsed: ParsedPrompt, refined: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """This shot's positive embedding with the leakage fix (the items this shot names) and ToMe's token merge
        applied (``refined``: the merge and end-token substitution are left to the shot's ``SemanticBinding``, which
        refines them)."""
        pipe, report, config = self.pipe, {}, self.plan.binding
        positive, where = self.plan.isolated(pipe, parsed.text, encode_positive(pipe, parsed.text, 1), strict=False)
        if where is not None:
            report["isolated"] = where
        groups = group_tokens(pipe.tokenizer, parsed) if config is not None else []
        if groups and not refined:
            positive = composite_tokens(positive, groups, config)
            if config.ets_step >= 0:
                length = len(pipe.tokenizer(parsed.text, add_special_tokens=False)["input_ids"])
                merged = encode_positive(pipe, attribute_free_prompt(parsed), 1)
                positive = end_token_substitution(positive, merged, length)
        if groups:
            report["binding"] = binding_report(groups)
        return positive, report

    def route(self, parsed: ParsedPrompt, frames: list[int]) -> dict[str, Any]:
        """LPA's biases with this shot's token positions, on this shot's rows of the conditional half."""
        offset = self.frames if self.cfg else 0
        rows = slice(offset + frames[0], offset + frames[-1] + 1)
        report = self.plan.route_lpa(self.attention, self.pipe.tokenizer, parsed, rows)
        if report is None:
            return {"skipped": "no style: write '... in X style' in the shot or fill the Style field"}
        return {**report, "frames": f"{frames[0]}-{frames[-1]}"}

    def condition(self, module, args: tuple, kwargs: dict):
        """UNet pre-hook: the conditional half of the per-frame context becomes the edited per-frame mix."""
        if self.refining:
            return None
        context = kwargs["encoder_hidden_states"]
        rows = slice(self.frames, 2 * self.frames) if self.cfg else slice(0, self.frames)
        context = context.clone()
        context[rows] = self.per_frame.to(context.dtype)
        return args, {**kwargs, "encoder_hidden_states": context}

    def __enter__(self) -> "ShotControls":
        if self.per_frame is not None:
            self._hook = self.pipe.unet.register_forward_pre_hook(self.condition, with_kwargs=True)
        self.attention.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.attention.remove()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
