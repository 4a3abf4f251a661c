"""Video tab: AnimateDiff text-to-video with a multi-shot prompt timeline.

The stock diffusers ``AnimateDiffPipeline`` runs the denoising loop. Tokenworks adds, each at its hook:
the shot timeline (``diffusion/timeline.py``) compiled to FreeNoise's ``{frame: prompt}`` keyframes with an exact
interpolation callback, FreeNoise's sliding context windows for videos longer than the motion module's
window, Stop and per-step progress through ``callback_on_step_end``. With one shot and no extras the call
is the stock pipeline's, so the output is bit-identical to it.

Loading, FreeNoise and the stock call live in ``diffusion/animatediff.py``, the image controls per shot in
``diffusion/shot_controls.py``, the MP4 and frame strip in ``outputs.py``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Iterator

import torch

from ..base import (NO_COMPARISON, Event, Pipeline, PipelineError, Progress, Request, Result, require_choice,
                    require_range, resolve_seed, same_seed_ab)
from ..diffusion.animatediff import decode, denoise, free_noise, load_animatediff
from ..diffusion.controls import ControlPlan
from ..diffusion.fast import FastUNet, choose_backend
from ..diffusion.lpa import LPAConfig
from ..diffusion.merging import DEFAULT_MIN_TOKENS, apply_merging, merging_stats, remove_merging
from ..diffusion.models import request_sides
from ..diffusion.prompts import ParsedPrompt
from ..diffusion.shot_controls import ShotControls
from ..diffusion.timeline import DEFAULT_SMOOTH_WINDOW, Timeline, request_timeline
from ..models import keep_placement, peak_memory_mb, reset_peak_memory
from ..outputs import save_video
from ..presets import PresetModels
from ..streaming import stream_in_thread

MAX_FRAMES = 128
MAX_STEPS = 100
MAX_SIDE = 1024
DEFAULT_SIDE = 512  # SD1.5's; a spec's ``size`` option overrides it (micro-world motion: 128 px)
# AnimateDiff motion modules are trained on 16-frame clips; FreeNoise's defaults are a 16-frame window, stride 4.
CONTEXT_LENGTH = 16
CONTEXT_STRIDE = 4
COMPARISONS = (NO_COMPARISON, "single prompt", "merging off", "controls off")


@dataclass
class VideoRequest(Request):
    prompt: str = ""
    negative_prompt: str = ""
    shots: str | list = ""  # JSON shot list; when it has shots it replaces `prompt` (see timeline.py)
    smooth_window: int = DEFAULT_SMOOTH_WINDOW
    model: str = ""
    num_frames: int = 16
    fps: int = 8
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 0  # 0 = the model's native side (a spec's ``size``, else DEFAULT_SIDE), as the UI and image tab
    height: int = 0
    context_length: int = CONTEXT_LENGTH
    context_stride: int = CONTEXT_STRIDE
    merge_ratio: float = 0.0  # token merging on the spatial self-attention only (diffusion/merging.py)
    merge_min_tokens: int = DEFAULT_MIN_TOKENS  # per frame; smaller layers run stock (merging would cost more)
    compare: str = NO_COMPARISON  # same-seed A/B: also render with one thing switched back (see COMPARISONS)
    # Image-tab token controls, per shot, on the spatial cross-attention (see ShotControls).
    binding: bool = False  # ToMe composite tokens + end-token substitution ([red hat] groups)
    lpa: bool = False  # Local Prompt Adaptation: content/style tokens routed to different layers
    style: str = ""  # LPA style ("" = find "in X style" in each shot's prompt)
    lpa_window: tuple[float, float] = LPAConfig.window  # the paper's best, late-only
    isolate: str = ""  # Follow-the-Flow leakage fix: comma-separated items re-encoded alone
    fast: bool = True  # captured UNet loop on CUDA (diffusion/fast.py); eager static path on CPU/ZeroGPU; False = stock

    @property
    def controlled(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate.strip())


@dataclass
class Plan:
    """A validated request: what the pipeline call needs."""

    timeline: Timeline
    num_frames: int
    steps: int
    width: int
    height: int
    fps: int
    guidance_scale: float
    context_length: int
    context_stride: int
    merge_ratio: float
    parsed: tuple[ParsedPrompt, ...] = ()  # each shot's prompt as the controls read it
    controls: ControlPlan = ControlPlan()  # the token controls, as in the image tab
    negative_prompt: str = ""

    @property
    def uses_free_noise(self) -> bool:
        return self.timeline.is_multi_shot or self.num_frames > self.context_length


class VideoPipeline(PresetModels, Pipeline):
    task = "video"
    unknown_label = "video model"
    request_type = VideoRequest

    def load(self, name: str):
        return self.store.load(self.spec_for(name), load_animatediff)

    def plan(self, request: VideoRequest) -> Plan:
        """Validate the request (resolving its seed) and compile its shot timeline."""
        num_frames = int(require_range(request.num_frames, "Frames", 2, MAX_FRAMES))
        steps = int(require_range(request.steps, "Steps", 1, MAX_STEPS))
        width, height = request_sides(request, self.spec_for(request.model), DEFAULT_SIDE, 32, MAX_SIDE)
        fps = int(require_range(request.fps, "FPS", 1, 60))
        guidance = require_range(request.guidance_scale, "CFG scale", 0.0, 30.0)
        window = int(require_range(request.smooth_window, "Smooth window", 2, MAX_FRAMES))
        context_length = int(require_range(request.context_length, "Context length", 8, 32))
        stride = int(require_range(request.context_stride, "Context stride", 1, context_length))
        merge_ratio = require_range(request.merge_ratio, "Merge ratio", 0.0, 0.75)
        require_range(request.merge_min_tokens, "Merge min tokens", 0, 2**20)
        timeline, parsed = request_timeline(request.shots, request.prompt, window, num_frames, request.style)
        controls = ControlPlan.from_request(request)
        request.seed = resolve_seed(request.seed)
        return Plan(timeline, num_frames, steps, width, height, fps, guidance, min(context_length, num_frames), stride,
                    merge_ratio, parsed, controls, request.negative_prompt or "")

    @contextmanager
    def applied(self, pipe, plan: Plan, request: VideoRequest) -> Iterator[ShotControls | None]:
        """Install this request's techniques on the cached pipeline, and take them off afterwards.

        FreeNoise first (see ``animatediff.free_noise``). Token merging hooks only the spatial transformers
        (frames folded into the batch)."""
        with free_noise(pipe, plan.uses_free_noise, plan.context_length, plan.context_stride):
            try:
                if plan.merge_ratio > 0:
                    apply_merging(pipe.unet, plan.merge_ratio, seed=request.seed,
                                  min_tokens=int(request.merge_min_tokens))
                if not plan.controls.active:
                    yield None
                else:
                    with ShotControls(pipe, plan) as controls:
                        yield controls
            finally:
                remove_merging(pipe.unet)

    def call_arguments(self, plan: Plan, request: VideoRequest) -> dict[str, Any]:
        timeline = plan.timeline
        prompt: str | dict[int, str] = (timeline.keyframes(plan.num_frames) if timeline.is_multi_shot
                                        else timeline.shots[0].prompt)
        return dict(prompt=prompt, negative_prompt=request.negative_prompt or None, num_frames=plan.num_frames,
                    height=plan.height, width=plan.width, num_inference_steps=plan.steps,
                    guidance_scale=plan.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent")

    def generate(self, request: VideoRequest) -> Iterator[Event]:
        plan = self.plan(request)
        baseline = self.baseline_request(request, plan)
        yield Progress(0, plan.steps, "loading model")
        pipe = self.load(request.model)
        render_a = None if baseline is None else partial(self.render, pipe, baseline, self.plan(baseline),
                                                         f"A: {request.compare}")
        render_b = partial(self.render, pipe, request, plan, "B: as set" if baseline is not None else "")
        with keep_placement(pipe, self.spec_for(request.model).name):
            result = yield from same_seed_ab(render_a, render_b, request.compare)
        yield result

    def baseline_request(self, request: VideoRequest, plan: Plan) -> VideoRequest | None:
        """The A side of a same-seed A/B: this request with one thing switched back to stock."""
        require_choice(request.compare, "comparison", COMPARISONS)
        if request.compare == "single prompt":
            if not plan.timeline.is_multi_shot:
                raise PipelineError("'single prompt' compares against a shot timeline: add at least two shots.")
            return replace(request, shots="", prompt=plan.timeline.shots[0].prompt, cancel=request.cancel)
        if request.compare == "controls off":
            if not request.controlled:
                raise PipelineError("'controls off' compares against token controls: turn on binding, LPA or the "
                                    "leakage fix.")
            return replace(request, binding=False, lpa=False, isolate="", cancel=request.cancel)
        if request.compare == "merging off":
            if plan.merge_ratio == 0:
                raise PipelineError("'merging off' compares against token merging: set a merge ratio above 0.")
            return replace(request, merge_ratio=0.0, cancel=request.cancel)
        return None

    def render(self, pipe, request: VideoRequest, plan: Plan, note: str) -> Iterator[Event]:
        """One video: denoise (with this request's techniques installed), decode, save; returns its Result."""
        device = self.store.device
        reset_peak_memory(device)
        start = time.perf_counter()
        with self.applied(pipe, plan, request) as controls:
            arguments = self.call_arguments(plan, request)
            emit_note = (lambda event: replace(event, note=note)) if note else (lambda event: event)
            fast = FastUNet(pipe.unet, choose_backend(device, request.fast, pipe.unet),
                            controls.attention if controls is not None else None, lambda: pipe.scheduler.timesteps)
            refine = controls.refine_step if controls is not None and controls.bindings else None

            def run(emit):
                if refine is not None:
                    emit(Progress(0, plan.steps, f"{note} ToMe refinement".strip()))
                    arguments["latents"] = controls.start(pipe, arguments)
                return denoise(pipe, arguments, plan.steps, request.cancel, lambda e: emit(emit_note(e)), fast, refine)

            latents = yield from stream_in_thread(run, request.cancel)
            request.cancel.raise_if_cancelled()
            denoise_s = time.perf_counter() - start
            merged = merging_stats(pipe.unet)
            yield Progress(plan.steps, plan.steps, f"{note} decoding".strip())
            frames = decode(pipe, latents)
        elapsed = time.perf_counter() - start
        parameters = self.parameters(request, plan)
        if controls is not None:
            parameters["controls"] = controls.report
        output = save_video(frames, plan.fps, parameters)
        # The MP4 and strip are written in the request's wall time: reported apart, so a served benchmark can
        # tell encoding from the GPU work (benchmarks/image_served_breakdown.py --arch video).
        stats = {"model": self.spec_for(request.model).name, "time_s": round(elapsed, 3),
                 "denoise_s": round(denoise_s, 3), "s_per_step": round(denoise_s / plan.steps, 4),
                 "decode_s": round(elapsed - denoise_s, 3),
                 "export_s": round(time.perf_counter() - start - elapsed, 3),
                 "peak_memory_mb": peak_memory_mb(device), **self.shot_stats(plan, merged, controls),
                 "seed": request.seed, **fast.stats()}
        return Result(output, stats, {"parameters": parameters})

    @staticmethod
    def shot_stats(plan: Plan, merged: dict[str, int], controls: ShotControls | None) -> dict[str, Any]:
        """What the timeline, merging and the shot controls did in one video."""
        return {
            "frames": plan.num_frames,
            "shots": len(plan.timeline.shots),
            "free_noise": plan.uses_free_noise,
            "tokens_merged": merged["tokens_merged"],
            "blocks_merged": merged["blocks_merged_per_call"],
            "biased_attention_calls": len(controls.attention.applied) if controls else 0,
            "binding_refinement_iterations": controls.refinement_iterations() if controls else 0,
            **({"binding_shots": {f"shot {i + 1}": b.summary() for i, b in controls.bindings.items()}}
               if controls and controls.bindings else {}),
        }

    def parameters(self, request: VideoRequest, plan: Plan) -> dict[str, Any]:
        """Everything needed to reproduce the video (written next to it as a sidecar JSON)."""
        values = {name: value for name, value in request.parameters().items() if name != "shots"}
        values.update(model=self.spec_for(request.model).name, shots=plan.timeline.describe(plan.num_frames),
                      keyframes=plan.timeline.keyframes(plan.num_frames), context_length=plan.context_length,
                      free_noise=plan.uses_free_noise)
        return values
