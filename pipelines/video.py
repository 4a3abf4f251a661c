"""Video tab: AnimateDiff text-to-video with a multi-shot prompt timeline.

The stock diffusers ``AnimateDiffPipeline`` runs the denoising loop. Tokenworks adds, each at its hook:
the shot timeline (``timeline.py``) compiled to FreeNoise's ``{frame: prompt}`` keyframes with an exact
interpolation callback, FreeNoise's sliding context windows for videos longer than the motion module's
window, Stop and per-step progress through ``callback_on_step_end``. With one shot and no extras the call
is the stock pipeline's, so the output is bit-identical to it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .base import (NO_COMPARISON, CancelToken, Event, Pipeline, PipelineError, Progress, Request, Result,
                   require_range, require_text, resolve_seed, with_baseline)
from .image.merging import DEFAULT_MIN_TOKENS, apply_merging, merging_stats, remove_merging
from .streaming import stream_in_thread
from .models import ModelSpec, ModelStore, ResolvedModel, keep_placement, peak_memory_mb
from .outputs import new_output_path, save_png, write_sidecar
from .presets import PresetModels, models_for
from .tiny import tiny_animatediff_pipeline
from .image.attention import AttentionControl
from .image.fast import FastUNet, choose_backend
from .image.binding import (SemanticBinding, attribute_free_prompt, composite_tokens, end_token_substitution,
                            group_tokens)
from .image.controls import ControlPlan, binding_report
from .image.lpa import LPAConfig
from .image.prompts import ParsedPrompt, encode_positive, parse_prompt
from .timeline import DEFAULT_SMOOTH_WINDOW, Shot, Timeline, parse_shots

MAX_FRAMES = 128
MAX_STEPS = 100
MAX_SIDE = 1024
STRIP_FRAMES = 8
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
    width: int = 512
    height: int = 512
    context_length: int = CONTEXT_LENGTH
    context_stride: int = CONTEXT_STRIDE
    merge_ratio: float = 0.0  # token merging on the spatial self-attention only (image/merging.py)
    merge_min_tokens: int = DEFAULT_MIN_TOKENS  # per frame; smaller layers run stock (merging would cost more)
    compare: str = NO_COMPARISON  # same-seed A/B: also render with one thing switched back (see COMPARISONS)
    # Image-tab token controls, per shot, on the spatial cross-attention (see ShotControls).
    binding: bool = False  # ToMe composite tokens + end-token substitution ([red hat] groups)
    lpa: bool = False  # Local Prompt Adaptation: content/style tokens routed to different layers
    style: str = ""  # LPA style ("" = find "in X style" in each shot's prompt)
    lpa_window: tuple[float, float] = LPAConfig.window  # the paper's best, late-only
    isolate: str = ""  # Follow-the-Flow leakage fix: comma-separated items re-encoded alone
    fast: bool = True  # captured UNet loop on CUDA (image/fast.py); eager static path on CPU/ZeroGPU; False = stock

    @property
    def controlled(self) -> bool:
        return bool(self.binding or self.lpa or self.isolate.strip())


@dataclass
class VideoOutput:
    video: str  # MP4 path
    strip: str  # PNG path: evenly spaced frames side by side
    frames: np.ndarray = field(repr=False)  # (frames, height, width, 3) floats in [0, 1]


def animatediff_scheduler(base: str | None):
    """DDIM with the settings the AnimateDiff authors (and the diffusers docs) use: linear betas, linspace."""
    from diffusers import DDIMScheduler

    settings = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)
    if base is None:
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, **settings)
    return DDIMScheduler.from_pretrained(base, subfolder="scheduler", **settings)


def load_animatediff(resolved: ResolvedModel, store: ModelStore):
    """A MotionAdapter (the spec's Hub id) on its SD1.5 base (the spec's ``base`` option), or the tiny one."""
    if resolved.source == "tiny":
        pipe = tiny_animatediff_pipeline().to(dtype=store.dtype)
    else:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        base_id = resolved.spec.option("base")
        base = store.resolve(ModelSpec(base_id, "sd15", hub_id=base_id)).location
        adapter = MotionAdapter.from_pretrained(resolved.location, torch_dtype=store.dtype)
        pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=adapter, torch_dtype=store.dtype)
        pipe.scheduler = animatediff_scheduler(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(store.device)


def exact_lerp(start_frame: int, end_frame: int, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """FreeNoise's segment interpolation, but exact at the ends and constant when both keys hold one prompt.

    A timeline segment either holds one shot (both keyframes carry the same prompt) or is a transition; a
    cut is a two-frame transition, so exact endpoints make it a true step function.
    """
    count = end_frame - start_frame + 1
    if torch.equal(start, end):
        return start.repeat(count, *([1] * (start.ndim - 1)))
    rows = [start]
    for index in range(1, count - 1):
        alpha = index / (count - 1)
        rows.append((1 - alpha) * start + alpha * end)
    rows.append(end)
    return torch.cat(rows)


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

    def __init__(self, store: ModelStore, preset: str = "auto") -> None:
        self.store = store
        self.preset = preset
        self.specs = models_for("video", preset)

    def load(self, name: str):
        return self.store.load(self.spec_for(name), load_animatediff)

    def plan(self, request: VideoRequest) -> Plan:
        """Validate the request (resolving its seed) and compile its shot timeline."""
        num_frames = int(require_range(request.num_frames, "Frames", 2, MAX_FRAMES))
        steps = int(require_range(request.steps, "Steps", 1, MAX_STEPS))
        width = int(require_range(request.width, "Width", 32, MAX_SIDE))
        height = int(require_range(request.height, "Height", 32, MAX_SIDE))
        if width % 8 or height % 8:
            raise PipelineError(f"Width and height must be multiples of 8, got {width}x{height}.")
        fps = int(require_range(request.fps, "FPS", 1, 60))
        guidance = require_range(request.guidance_scale, "CFG scale", 0.0, 30.0)
        window = int(require_range(request.smooth_window, "Smooth window", 2, MAX_FRAMES))
        context_length = int(require_range(request.context_length, "Context length", 8, 32))
        stride = int(require_range(request.context_stride, "Context stride", 1, context_length))
        merge_ratio = require_range(request.merge_ratio, "Merge ratio", 0.0, 0.75)
        require_range(request.merge_min_tokens, "Merge min tokens", 0, 2**20)
        timeline = parse_shots(request.shots, window)
        if not timeline.shots:
            timeline = Timeline((Shot(0, require_text(request.prompt)),), window)
        timeline.validate(num_frames)
        # Controls read [group] markers and the style phrase; the model always sees the cleaned text (as in the
        # image tab), so a controls-off A/B renders the same words. Plain prompts pass through unchanged.
        parsed = tuple(parse_prompt(shot.prompt, request.style) for shot in timeline.shots)
        timeline = Timeline(tuple(replace(shot, prompt=item.text) for shot, item in zip(timeline.shots, parsed)),
                            window)
        controls = ControlPlan.from_request(request)
        request.seed = resolve_seed(request.seed)
        return Plan(timeline, num_frames, steps, width, height, fps, guidance, min(context_length, num_frames), stride,
                    merge_ratio, parsed, controls, request.negative_prompt or "")

    @contextmanager
    def applied(self, pipe, plan: Plan, request: VideoRequest) -> Iterator["ShotControls | None"]:
        """Install this request's techniques on the cached pipeline, and take them off afterwards.

        FreeNoise first: it swaps the motion modules' transformer blocks, which must not discard anything
        installed after it. Token merging hooks only the spatial transformers (frames folded into the batch).
        """
        if plan.uses_free_noise:
            pipe.enable_free_noise(context_length=plan.context_length, context_stride=plan.context_stride,
                                   prompt_interpolation_callback=exact_lerp)
        if plan.merge_ratio > 0:
            apply_merging(pipe.unet, plan.merge_ratio, seed=request.seed, min_tokens=int(request.merge_min_tokens))
        controls = ShotControls(pipe, plan) if plan.controls.active else None
        try:
            if controls is None:
                yield None
            else:
                with controls:
                    yield controls
        finally:
            remove_merging(pipe.unet)
            if plan.uses_free_noise:
                disable_free_noise(pipe)

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
        reference = None
        with keep_placement(pipe, self.spec_for(request.model).name):
            if baseline is not None:
                reference = yield from self.render(pipe, baseline, self.plan(baseline), f"A: {request.compare}")
            output, stats, parameters = yield from self.render(pipe, request, plan, "B: as set" if reference else "")
        result = Result(output, stats, {"parameters": parameters})
        if reference is not None:
            result = with_baseline(result, Result(reference[0], reference[1], {"parameters": reference[2]}),
                                   request.compare)
        yield result

    def baseline_request(self, request: VideoRequest, plan: Plan) -> VideoRequest | None:
        """The A side of a same-seed A/B: this request with one thing switched back to stock."""
        if request.compare not in COMPARISONS:
            raise PipelineError(f"Unknown comparison {request.compare!r}. Choose one of: {', '.join(COMPARISONS)}.")
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
        """One video: denoise (with this request's techniques installed), decode, save; returns
        ``(VideoOutput, stats, parameters)``."""
        device = self.store.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with self.applied(pipe, plan, request) as controls:
            arguments = self.call_arguments(plan, request)
            emit_note = (lambda event: replace(event, note=note)) if note else (lambda event: event)
            fast = FastUNet(pipe.unet, choose_backend(device, request.fast, pipe.unet),
                            controls.attention if controls is not None else None, lambda: pipe.scheduler.timesteps)
            refine = controls.refine if controls is not None and controls.bindings else None

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
        stats = {
            "model": self.spec_for(request.model).name,
            "time_s": round(elapsed, 3),
            "denoise_s": round(denoise_s, 3),
            "s_per_step": round(denoise_s / plan.steps, 4),
            "peak_memory_mb": peak_memory_mb(device),
            "frames": plan.num_frames,
            "shots": len(plan.timeline.shots),
            "free_noise": plan.uses_free_noise,
            "tokens_merged": merged["tokens_merged"],
            "blocks_merged": merged["blocks_merged_per_call"],
            "biased_attention_calls": len(controls.attention.applied) if controls else 0,
            "binding_refinement_iterations": controls.refinement_iterations() if controls else 0,
            **({"binding_shots": {f"shot {i + 1}": b.summary() for i, b in controls.bindings.items()}}
               if controls and controls.bindings else {}),
            "seed": request.seed,
            **fast.stats(),
        }
        return output, stats, parameters

    def parameters(self, request: VideoRequest, plan: Plan) -> dict[str, Any]:
        """Everything needed to reproduce the video (written next to it as a sidecar JSON)."""
        values = {item.name: getattr(request, item.name) for item in fields(request)
                  if item.name not in ("cancel", "shots")}
        values.update(model=self.spec_for(request.model).name, shots=plan.timeline.describe(plan.num_frames),
                      keyframes=plan.timeline.keyframes(plan.num_frames), context_length=plan.context_length,
                      free_noise=plan.uses_free_noise)
        return values


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

    def refinement_iterations(self) -> int:
        return sum(len(binding.history) for binding in self.bindings.values())

    def edit_shot(self, parsed, refined: bool) -> tuple[torch.Tensor, dict[str, Any]]:
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

    def route(self, parsed, frames: list[int]) -> dict[str, Any]:
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


def disable_free_noise(pipe) -> None:
    """``pipe.disable_free_noise()`` without its crash on adapters that have no mid-block motion module.

    diffusers 0.42 rebuilds the block list with ``mid_block`` unconditionally, so AnimateDiff v1-5-3
    (``use_motion_mid_block=False``) raises AttributeError; skip blocks without motion modules instead.
    """
    pipe._free_noise_context_length = None
    for block in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]:
        if hasattr(block, "motion_modules"):
            pipe._disable_free_noise_in_block(block)


def denoise(pipe, arguments: dict[str, Any], total: int, cancel: CancelToken,
            emit: Callable[[Event], None], fast: FastUNet | None = None,
            refine: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The stock diffusers call; ``callback_on_step_end`` reports each step and turns Stop into
    ``pipe._interrupt``, which makes the stock loop skip its remaining steps (the caller then skips decoding).
    With ``fast`` the UNet calls take the captured path (image/fast.py); the callback advances its step."""
    fast = fast or FastUNet(pipe.unet, "off")

    def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
        fast.step = step + 1
        emit(Progress(step + 1, total))
        if cancel.cancelled:
            pipeline._interrupt = True
            return {}
        if refine is None or step + 1 >= total:
            return {}
        with fast.suspended():
            return {"latents": refine(step + 1, pipeline.scheduler.timesteps[step + 1], tensors["latents"])}

    with fast:
        return pipe(**arguments, callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents"]).frames


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """The stock pipeline's own decode and post-processing, as (frames, height, width, 3) floats in [0, 1]."""
    with torch.no_grad():
        video = pipe.decode_latents(latents, decode_chunk_size=16)
        return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_video(frames: np.ndarray, fps: int, parameters: dict[str, Any]) -> VideoOutput:
    """H.264 yuv420p MP4 (what browsers play) plus a frame strip PNG, both with their parameters."""
    import imageio

    path = new_output_path("video", ".mp4")
    pixels = to_uint8(frames)
    # yuv420p needs even sides; sizes are multiples of 8, so no rescaling (macro_block_size=1). x264's
    # "veryfast" preset: 16 frames at 512 px encode 4x faster than its default "medium" (1.35 s vs 5.4 s on 2
    # cores), at crf 18 still visually lossless; the user waits for this after every generation.
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=1, ffmpeg_log_level="error",
                            output_params=["-movflags", "+faststart", "-crf", "18", "-preset", "veryfast"]) as writer:
        for frame in pixels:
            writer.append_data(frame)
    write_sidecar(path, parameters)
    strip = save_png(frame_strip(pixels), parameters, path.with_suffix(".strip.png"))
    return VideoOutput(str(path), str(strip), frames)


def frame_strip(pixels: np.ndarray, count: int = STRIP_FRAMES):
    """Up to ``count`` evenly spaced frames side by side, as a PIL image."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(pixels) - 1, min(count, len(pixels))).round().astype(int))
    return Image.fromarray(np.concatenate([pixels[index] for index in picks], axis=1))
