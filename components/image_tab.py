"""Image tab UI: SD1.5/SDXL with token-level controls, same-seed A/B, attention heatmaps. API: /generate_image."""
from __future__ import annotations

import json
from typing import Any, Iterator

import gradio as gr

from pipelines.base import Partial, PipelineError, Progress, Result
from pipelines.image.compass import draw_compass_preview, parse_compass_objects
from pipelines.image.pipeline import MAX_BATCH, MAX_STEPS, SCHEDULERS, ImagePipeline, ImageRequest

from .common import (GPU_LANE, RANDOM_WEIGHTS_NOTE, clear_on_start, link_seed_reuse, number, on_gpu, run_pipeline,
                     seed_row, stats_panel, wire_stop)

EXAMPLES = [
    ["a [red hat] and a [blue car]", False, ""],
    ["a white cat and a black dog, a castle in watercolor style", True, ""],
    ["a pool by a table", False, "pool"],
]


def build(pipeline: ImagePipeline) -> None:
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="image-prompt",
                                placeholder="a [red hat] and a [blue car] in watercolor style")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="image-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="image-stop")
            with gr.Row():
                images = gr.Gallery(label="Controlled (or plain when no control is on)", type="filepath",
                                    format="png", columns=2, elem_id="image-output")
                baseline = gr.Gallery(label="Baseline: same seed, controls off (A/B)", type="filepath",
                                      format="png", columns=2, elem_id="image-baseline")
            heatmaps = gr.Gallery(label="Cross-attention heatmaps", type="filepath", format="png", columns=4)
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=pipeline.default_model_name(), label="Model",
                                allow_custom_value=True, info="A listed model, a Hub id or a local folder")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Scheduler")
            steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
            cfg = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="CFG scale")
            with gr.Row():
                width = gr.Number(label="Width (0 = native)", value=0, precision=0, minimum=0, maximum=2048, step=8)
                height = gr.Number(label="Height (0 = native)", value=0, precision=0, minimum=0, maximum=2048, step=8)
            batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size")
            seed = seed_row()
            compare = gr.Checkbox(label="A/B: also render the baseline with the same seed", value=True)
            with gr.Accordion("Semantic binding (ToMe)", open=False):
                binding = gr.Checkbox(label="Bind attributes to objects", value=False,
                                      info="Groups: [red hat] syntax, else found automatically")
                ets_step = gr.Number(label="End-token substitution step (-1 = off)", value=0, precision=0,
                                     minimum=-1, maximum=MAX_STEPS - 1, info="A denoising step below Steps")
            with gr.Accordion("Local Prompt Adaptation (LPA)", open=False):
                lpa = gr.Checkbox(label="Route content and style tokens", value=False,
                                  info="Style from '... in X style' or the field below")
                style = gr.Textbox(label="Style (optional)", placeholder="watercolor")
                with gr.Row():
                    window_low = gr.Number(label="Window start t", value=300, precision=0)
                    window_high = gr.Number(label="Window end t", value=650, precision=0)
            with gr.Accordion("Leakage fix (Follow the Flow)", open=False):
                isolate = gr.Textbox(label="Items to encode alone (comma-separated)", placeholder="pool")
            with gr.Accordion("Compass Control (object orientation)", open=False):
                gr.Markdown("One row per object: a word of the prompt, its heading in degrees (0 = facing the "
                            "viewer, 90 = right, 180 = away, 270 = left) and its box in 0..1 image coordinates.")
                compass_table = gr.Dataframe(headers=list(COMPASS_COLUMNS), datatype=["str"] + ["number"] * 5,
                                             value=[], row_count=(0, "dynamic"), column_count=(6, "fixed"),
                                             label="Objects", interactive=True)
                compass_json = gr.Textbox(label="Objects as JSON (what the API takes)", lines=2,
                                          placeholder='[{"name": "car", "angle": 90, "box": [0, 0.4, 0.5, 0.9]}]')
                compass_encoder = gr.Textbox(label="Compass encoder", value="phrase",
                                             info="'phrase' (training-free) or a folder with an official or "
                                                  "trained compass checkpoint")
                compass_preview = gr.Image(label="Boxes and headings", type="pil", height=200, interactive=False)
            with gr.Accordion("Token merging for speed", open=False):
                merge_ratio = gr.Slider(0.0, 0.75, value=0.0, step=0.05, label="Merge ratio r (0 = off)")
            heatmap_words = gr.Textbox(label="Heatmap words (comma-separated)", placeholder="hat, car")
            fast = gr.Checkbox(label="Fast path (captured UNet loop)", value=True,
                               info="CUDA graphs on a GPU, controls and merging kept; capture_s in the stats "
                                    "the first time; eager on CPU and ZeroGPU")
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[prompt, lpa, isolate])

    @on_gpu
    def generate_image(prompt_text, negative_text, model_name, scheduler_name, steps_value, cfg_value, width_value,
                       height_value, batch_value, seed_value, compare_value, binding_value, ets_value, lpa_value,
                       style_text, low_value, high_value, isolate_text, ratio_value, heatmap_text,
                       compass_text, compass_choice, fast_value, request: gr.Request) -> Iterator[tuple]:
        image_request = ImageRequest(
            prompt=prompt_text, negative_prompt=negative_text or "", model=model_name or "",
            scheduler=scheduler_name or "default", steps=int(number(steps_value, 30)), cfg=number(cfg_value, 7.5),
            width=int(number(width_value, 0)), height=int(number(height_value, 0)),
            batch_size=int(number(batch_value, 1)), seed=int(number(seed_value, -1)), compare=bool(compare_value),
            binding=bool(binding_value), ets_step=int(number(ets_value, 0)), lpa=bool(lpa_value),
            style=style_text or "", lpa_window=(number(low_value, 300), number(high_value, 650)),
            isolate=isolate_text or "", merge_ratio=number(ratio_value, 0.0), heatmap_words=heatmap_text or "",
            compass=compass_text or "", compass_encoder=compass_choice or "phrase",
            fast=True if fast_value is None else bool(fast_value),
        )
        for event in run_pipeline(pipeline, image_request, request):
            if isinstance(event, Partial):
                yield event.value, gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Progress):  # from the first (model loading) on: Gradio's own cancel needs a yield
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Result):
                heat = event.metadata.get("heatmaps", []) + event.metadata.get("baseline_heatmaps", [])
                yield (event.value, event.metadata.get("baseline", []), [tuple(h) for h in heat], event.stats)

    inputs = [prompt, negative, model, scheduler, steps, cfg, width, height, batch, seed, compare, binding, ets_step,
              lpa, style, window_low, window_high, isolate, merge_ratio, heatmap_words, compass_json, compass_encoder,
              fast]
    outputs = [images, baseline, heatmaps, stats]
    clear_on_start([generate.click], outputs)
    event = generate.click(generate_image, inputs=inputs, outputs=outputs, api_name="generate_image", **GPU_LANE)
    wire_stop(stop, "image", [event], stats)
    compass_table.input(compass_rows_to_json, inputs=compass_table, outputs=compass_json, api_visibility="private")
    compass_json.change(compass_preview_image, inputs=compass_json, outputs=compass_preview, api_visibility="private")
    link_seed_reuse(seed, stats)


COMPASS_COLUMNS = ("name", "angle", "x0", "y0", "x1", "y1")


def compass_rows_to_json(table: Any) -> str:
    """The objects table as the JSON list the pipeline and API take (rows without a name are skipped)."""
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    objects = []
    for row in rows:
        name, angle, *box = (list(row) + [None] * 6)[:6]
        if not name or not str(name).strip():
            continue
        item: dict[str, Any] = {"name": str(name).strip(), "angle": 0 if angle in (None, "") else angle}
        if all(v not in (None, "") for v in box):
            item["box"] = box
        objects.append(item)
    return json.dumps(objects) if objects else ""


def compass_preview_image(text: str) -> Any:
    """Preview of the boxes and headings; malformed JSON shows as a toast, not a crash."""
    try:
        objects = parse_compass_objects(text)
    except PipelineError as error:
        raise gr.Error(str(error), print_exception=False) from None
    return draw_compass_preview(objects) if objects else None

