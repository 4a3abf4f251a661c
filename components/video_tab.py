"""Video tab UI: AnimateDiff with a shot timeline, token controls, token merging and a same-seed A/B.

API: /generate_video -> (video, A/B baseline video or None, frame strip, stats)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import gradio as gr

from pipelines.base import PipelineError, Progress, Result
from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS
from pipelines.diffusion.timeline import TRANSITIONS, add_shot, parse_shots, remove_last_shot
from pipelines.presets import MICROWORLD_VIDEO_MODEL
from pipelines.tabs.video import COMPARISONS, MAX_FRAMES, MAX_STEPS, VideoPipeline, VideoRequest

from .common import (link_seed_reuse, lpa_window, lpa_window_row, number, on_gpu, refresh_availability, run_buttons,
                     run_pipeline, seed_row, size_row, stats_panel, tab_notices, tab_outputs, wire_generate)


SHOTS_HELP = (
    'Shots as JSON: `[{"start": 0, "prompt": "..."}, {"start": 8, "prompt": "...", "transition": "cut"}]`. '
    f"Transition ({' or '.join(TRANSITIONS)}) says how a shot begins: `smooth` blends the text across the "
    "smooth window around its start, `cut` switches at its first frame. Leave empty to use the prompt above "
    "for every frame."
)
EXAMPLE_SHOTS = (
    '[\n {"start": 0, "prompt": "a red fox walking through snow, cinematic"},\n'
    ' {"start": 8, "prompt": "a red fox running across a frozen lake, cinematic", "transition": "smooth"},\n'
    ' {"start": 16, "prompt": "close-up of a red fox sleeping by a fire", "transition": "cut"}\n]'
)

# Micro-world motion knows only its scenes' words (5 shapes, 8 colours, 8 directions, "moving", "spinning"): a photo
# negative prompt reaches its tokenizer as letter fragments, and it was trained with empty captions for guidance and
# sampled at CFG 5 (pipelines/microworld/train_motion.py).
FAMILY_DEFAULTS = {  # micro-world? -> (prompt placeholder, negative prompt, CFG, what the model picker says of it)
    True: ("a red circle moving right", "", 5.0, "Micro-world motion, trained here: its frames stay coherent, but "
           "objects do not yet move the way the prompt says (README)."),
    False: ("a red fox walking through snow, cinematic", "low quality, blurry", 7.5, None),
}


def model_defaults(name: str | None, negative: str | None, cfg: float | None) -> tuple[dict, ...]:
    """Updates for the picked model: its prompt placeholder, and its negative prompt and CFG where those fields still
    hold the other family's defaults (values a person typed stay). Order: model info, prompt, negative prompt, CFG."""
    microworld = name == MICROWORLD_VIDEO_MODEL
    placeholder, own_negative, own_cfg, info = FAMILY_DEFAULTS[microworld]
    _, other_negative, other_cfg, _ = FAMILY_DEFAULTS[not microworld]
    return (gr.update(info=info), gr.update(placeholder=placeholder),
            gr.update(value=own_negative) if (negative or "") == other_negative else gr.skip(),
            gr.update(value=own_cfg) if cfg == other_cfg else gr.skip())


def describe(shots_text: str, frames: float | None, window: float | None) -> str:
    """A Markdown table of the shots' frame ranges, or the reason the list cannot be used."""
    if not (shots_text or "").strip():
        return "Single shot: the prompt conditions every frame."
    try:
        rows = parse_shots(shots_text, int(number(window, 8))).describe(int(number(frames, 16)))
    except PipelineError as error:
        return f"⚠️ {error}"
    lines = ["| shot | frames | begins with | prompt |", "|---|---|---|---|"]
    lines += [f"| {row['shot']} | {row['frames']} | {row['transition']} | {row['prompt']} |" for row in rows]
    return "\n".join(lines)


def shot_editor(transition: str | None):
    """Click handler: append a shot with ``transition`` (None removes the last shot); bad JSON -> gr.Error."""

    def edit(shots_text: str, frames: float | None) -> str:
        try:
            if transition is None:
                return remove_last_shot(shots_text)
            return add_shot(shots_text, int(number(frames, 16)), transition)
        except PipelineError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return edit


@dataclass
class ShotTimeline:
    """The shot timeline accordion's widgets: the JSON, its editing buttons and the frame ranges it gives."""

    shots: gr.Code
    editors: list[tuple[gr.Button, str | None]]  # (button, transition it appends; None removes the last shot)
    example: gr.Button
    ranges: gr.Markdown


def shot_timeline() -> ShotTimeline:
    """The closed accordion where a multi-shot prompt is written, edited with buttons and read back as ranges."""
    with gr.Accordion("Shot timeline (multi-shot prompts)", open=False):
        gr.Markdown(SHOTS_HELP)
        shots = gr.Code(label="Shots (JSON)", language="json", value="", lines=6, elem_id="video-shots")
        with gr.Row():
            add_cut = gr.Button("Add shot (cut)", size="sm")
            add_smooth = gr.Button("Add shot (smooth)", size="sm")
            remove = gr.Button("Remove last shot", size="sm")
            example = gr.Button("Example timeline", size="sm")
        ranges = gr.Markdown(describe("", 16, 8))
    return ShotTimeline(shots, [(add_cut, "cut"), (add_smooth, "smooth"), (remove, None)], example, ranges)


def wire_timeline(timeline: ShotTimeline, frames: gr.Slider, window: gr.Slider) -> None:
    """The editing buttons rewrite the JSON; the ranges follow the JSON, the frame count and the smooth window."""
    for button, transition in timeline.editors:
        button.click(shot_editor(transition), inputs=[timeline.shots, frames], outputs=timeline.shots,
                     api_visibility="private")
    timeline.example.click(lambda: EXAMPLE_SHOTS, outputs=timeline.shots, api_visibility="private")
    for trigger in (timeline.shots.change, frames.change, window.change):
        trigger(describe, inputs=[timeline.shots, frames, window], outputs=timeline.ranges, api_visibility="private")


def advanced_settings(tiny: bool) -> list:
    """The closed accordions of long-video, token-merging and per-shot token-control settings, in the order
    /generate_video takes them: smooth window, context length and stride, merge ratio and minimum tokens, binding,
    LPA, style, the LPA window's two ends, the leakage fix's items."""
    with gr.Accordion("Long videos and transitions", open=False):
        window = gr.Slider(2, 32, value=8, step=1, label="Smooth transition window (frames)")
        context_length = gr.Slider(8, 32, value=16, step=1, label="Context window (FreeNoise)",
                                   info="Videos longer than this (or with shots) slide this window")
        context_stride = gr.Slider(1, 16, value=4, step=1, label="Context stride")
    with gr.Accordion("Token merging for speed (spatial layers only)", open=False):
        merge_ratio = gr.Slider(0.0, 0.75, value=0.0, step=0.05, label="Merge ratio r (0 = off)")
        merge_min_tokens = gr.Number(label="Merge only layers with at least this many tokens per frame",
                                     value=0 if tiny else DEFAULT_MIN_TOKENS, precision=0, minimum=0)
    with gr.Accordion("Token controls per shot (from the image tab)", open=False):
        binding = gr.Checkbox(label="Semantic binding (ToMe composite tokens + end-token substitution)",
                              value=False, info="Mark groups like 'a [red hat] and a [blue car]'")
        lpa = gr.Checkbox(label="Local Prompt Adaptation (route content and style tokens)", value=False,
                          info="Style from '... in X style' in each shot, or the field below")
        style = gr.Textbox(label="Style (optional, appended to every shot)", placeholder="watercolor")
        window_low, window_high = lpa_window_row("LPA window")
        isolate = gr.Textbox(label="Leakage fix: items to encode alone (comma-separated)", placeholder="pool")
    return [window, context_length, context_stride, merge_ratio, merge_min_tokens, binding, lpa, style, window_low,
            window_high, isolate]


def video_generator(pipeline: VideoPipeline) -> Callable[..., Iterator[tuple]]:
    """/generate_video's handler: the UI's values as a VideoRequest; progress per step, then the tab's outputs."""

    @on_gpu
    def generate_video(prompt_text, negative_text, shots_text, model_name, frames_value, fps_value, steps_value,
                       cfg_value, width_value, height_value, seed_value, compare_value, window_value, length_value,
                       stride_value, ratio_value, min_tokens_value, binding_value, lpa_value, style_text, low_value,
                       high_value, isolate_text, fast_value, request: gr.Request,
                       progress=gr.Progress()) -> Iterator[tuple]:
        video_request = VideoRequest(
            prompt=prompt_text or "", negative_prompt=negative_text or "", shots=shots_text or "",
            model=model_name or "", num_frames=int(number(frames_value, 16)), fps=int(number(fps_value, 8)),
            steps=int(number(steps_value, 25)), guidance_scale=number(cfg_value, 7.5),
            width=int(number(width_value, 0)), height=int(number(height_value, 0)),
            seed=int(number(seed_value, -1)), compare=compare_value or "none",
            smooth_window=int(number(window_value, 8)), context_length=int(number(length_value, 16)),
            context_stride=int(number(stride_value, 4)), merge_ratio=number(ratio_value, 0.0),
            merge_min_tokens=int(number(min_tokens_value, DEFAULT_MIN_TOKENS)), binding=bool(binding_value),
            lpa=bool(lpa_value), style=style_text or "", lpa_window=lpa_window(low_value, high_value),
            isolate=isolate_text or "", fast=True if fast_value is None else bool(fast_value),
        )

        def show(event: Progress) -> None:
            progress((event.step, max(event.total, 1)), desc=event.note or "denoising")

        def outputs(result: Result) -> tuple:
            reference = result.baseline
            return result.value.video, reference.value.video if reference else None, result.value.strip, result.stats

        yield from tab_outputs(run_pipeline(pipeline, video_request, request), 4, outputs, on_progress=show)

    return generate_video


def build(pipeline: VideoPipeline) -> None:
    """The video tab: prompt, shot timeline and the A/B videos on the left; model and settings on the right."""
    tiny = pipeline.preset == "tiny"
    notice = tab_notices(pipeline)
    default_model = pipeline.default_model_name()
    placeholder, default_negative, default_cfg, info = FAMILY_DEFAULTS[default_model == MICROWORLD_VIDEO_MODEL]
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="video-prompt", placeholder=placeholder)
            negative = gr.Textbox(label="Negative prompt", lines=1, value="" if tiny else default_negative,
                                  elem_id="video-negative")
            timeline = shot_timeline()
            generate, stop = run_buttons("video")
            with gr.Row():
                video = gr.Video(label="Video (B: as set)", format="mp4", elem_id="video-output", autoplay=True,
                                 loop=True)
                baseline = gr.Video(label="A/B baseline (A: same seed)", format="mp4", elem_id="video-baseline",
                                    loop=True)
            strip = gr.Image(label="Frame strip", type="filepath", format="png", elem_id="video-strip")
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=default_model, label="Model", elem_id="video-model",
                                info=info)
            frames = gr.Slider(2, MAX_FRAMES, value=8 if tiny else 16, step=1, label="Frames")
            fps = gr.Slider(1, 30, value=8, step=1, label="FPS")
            steps = gr.Slider(1, MAX_STEPS, value=2 if tiny else 25, step=1, label="Steps")
            cfg = gr.Slider(0.0, 20.0, value=default_cfg, step=0.5, label="CFG scale", elem_id="video-cfg")
            width, height = size_row(1024)
            seed = seed_row()
            compare = gr.Dropdown(list(COMPARISONS), value="none", label="Same-seed A/B",
                                  info="Also render with one thing switched back: the timeline (first shot's "
                                       "prompt only), token merging or the token controls")
            advanced = advanced_settings(tiny)
            fast = gr.Checkbox(label="Fast path (captured UNet loop)", value=True,
                               info="CUDA graphs on a GPU, controls and merging kept; eager on CPU and ZeroGPU")
            stats = stats_panel()
    wire_timeline(timeline, frames, window=advanced[0])
    inputs = [prompt, negative, timeline.shots, model, frames, fps, steps, cfg, width, height, seed, compare,
              *advanced, fast]
    outputs = [video, baseline, strip, stats]
    wire_generate("video", generate, stop, video_generator(pipeline), inputs, outputs, outputs, stats)
    link_seed_reuse(seed, stats)
    model.change(model_defaults, inputs=[model, negative, cfg], outputs=[model, prompt, negative, cfg],
                 api_visibility="private", queue=False)
    refresh_availability(pipeline, notice, generate, {model: pipeline.model_choices})
