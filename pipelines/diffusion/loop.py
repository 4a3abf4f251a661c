"""The per-step callback that image and video hand to the stock diffusers loop (``callback_on_step_end``).

Both tabs let diffusers run the denoising loop and do their own work between steps: advance the fast path's
step (diffusion/fast.py), run ToMe's refinement for the next step outside the captured path, report progress,
and turn Stop into ``pipe._interrupt``, which makes the stock loop skip its remaining steps (the caller then
skips decoding).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..base import CancelToken, Event, Progress
from .attention import AttentionControl
from .fast import FastUNet

# (step, timestep, the callback's tensors) -> the tensors to replace (ToMe's refinement for ``step``)
Refine = Callable[[int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def step_callback(total: int, cancel: CancelToken, emit: Callable[[Event], None], fast: FastUNet,
                  refine: Refine | None = None, control: AttentionControl | None = None,
                  on_latents: Callable[[int, torch.Tensor], None] | None = None) -> Callable[..., dict]:
    """``callback_on_step_end`` for a run of ``total`` steps. ``refine`` runs before every step but the first
    (its step 0 runs before the loop) unless Stop was pressed; ``on_latents`` sees each step's latents after it
    (live previews)."""

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
        step = index + 1
        fast.step = step
        if control is not None:
            control.step = step
        out: dict[str, torch.Tensor] = {}
        if refine is not None and step < total and not cancel.cancelled:
            with fast.suspended():
                out = refine(step, pipe.scheduler.timesteps[step], tensors)
        if on_latents is not None:
            on_latents(step, out.get("latents", tensors["latents"]))
        emit(Progress(step, total))
        if cancel.cancelled:
            pipe._interrupt = True
        return out

    return on_step_end
