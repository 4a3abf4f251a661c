"""ACE-Step 1.5, the song tab's mixed mode: one model renders the whole song (vocals and accompaniment together)
through diffusers' stock ``AceStepPipeline``, run on a worker thread so each diffusion step's Progress streams
out as it happens and Stop takes effect at the next step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

import numpy as np
import torch

from ..base import CancelToken, Event, Progress
from ..models import ModelStore, ResolvedModel
from ..streaming import stream_in_thread
from ..tiny import tiny_ace_step
from .pcm import limit_peak


def load_ace_step(resolved: ResolvedModel, store: ModelStore):
    if resolved.source == "tiny":
        return tiny_ace_step().to(store.device)
    from diffusers import AceStepPipeline

    pipe = AceStepPipeline.from_pretrained(resolved.location, torch_dtype=store.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(store.device)


@dataclass
class RenderedSong:
    audio: np.ndarray  # [channels, samples] float32, peak-limited to -1 dBFS
    sample_rate: int
    steps: int  # diffusion steps that ran


def render_song(pipe, style: str, lyrics: str, duration_s: float, steps: int, guidance_scale: float, seed: int,
                cancel: CancelToken) -> Generator[Event, None, RenderedSong]:
    """Yield a Progress per diffusion step; return the song (``yield from``)."""
    done: list[int] = []

    def render(emit) -> Any:
        def on_step_end(pipeline, step, timestep, callback_kwargs):
            done.append(step)
            emit(Progress(step + 1, steps, "diffusion"))
            if cancel.cancelled:
                pipeline._interrupt = True
            return callback_kwargs

        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(prompt=style, lyrics=lyrics, audio_duration=duration_s, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, callback_on_step_end=on_step_end)

    output = yield from stream_in_thread(render, cancel)
    cancel.raise_if_cancelled()
    audio = output.audios[0].float().cpu().numpy()
    return RenderedSong(limit_peak(audio), int(pipe.sample_rate), len(done))
