"""Image tab UI: SD1.5/SDXL with token-level controls, same-seed A/B, attention heatmaps. API: /generate_image."""
from __future__ import annotations

import json
from dataclasses import astuple, dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from pipelines.base import NO_COMPARISON, PipelineError, Result
from pipelines.diffusion.compass import draw_compass_preview, parse_compass_objects
from pipelines.diffusion.merging import DEFAULT_MIN_TOKENS
from pipelines.tabs.image import MAX_BATCH, MAX_STEPS, SCHEDULERS, ImagePipeline, ImageRequest
from pipelines.microworld import WEIGHTS_V2, served_weights
from pipelines.presets import MICROWORLD_MODEL

from .common import (link_seed_reuse, lpa_window, lpa_window_row, number, on_gpu, refresh_availability, run_buttons,
                     run_pipeline, seed_row, size_row, stats_panel, tab_notices, tab_outputs, wire_generate)


@dataclass(frozen=True)
class ImageExample:
    """One example: a prompt, the controls it turns on (every control it does not name is set off) and the visible
    sampling settings it suits."""

    prompt: str
    binding: bool = False
    lpa: bool = False
    style: str = ""
    isolate: str = ""
    compass: str = ""
    merge_ratio: float = 0.0
    heatmap_words: str = ""
    compass_encoder: str = "phrase"
    steps: int = 30
    cfg: float = 7.5
    seed: int = -1

    def row(self) -> list[Any]:
        """Every field in order: the values of ``example_sets``' inputs."""
        return list(astuple(self))

    def settings(self) -> str:
        """The controls the example turns on, as a person reads them."""
        compass = ", ".join(f"{o['name']} at {o['angle']}°" for o in json.loads(self.compass)) if self.compass else ""
        if compass and self.compass_encoder not in ("", "phrase"):
            compass += " (trained encoder)"
        settings = [name for name, on in (("Binding on", self.binding), ("LPA on", self.lpa),
                                          (f"style '{self.style}'", self.style),
                                          (f"leakage fix: '{self.isolate}' encoded alone", self.isolate),
                                          (f"compass: {compass}", compass),
                                          (f"merge ratio {self.merge_ratio}", self.merge_ratio),
                                          (f"heatmaps of {self.heatmap_words}", self.heatmap_words)) if on]
        text = "; ".join(settings) or "every control off"
        return text[0].upper() + text[1:]

    def label(self) -> str:
        """What a person sees before clicking: the settings first (long prompts are cut at the end), then the prompt."""
        return f"{self.settings()} · {self.prompt}"


# Micro-world v2 knows 5 shapes, 8 colours, 4 fill styles and 8 headings (pipelines/microworld/scenes_v2.py); each
# shape has a favourite colour, and a shape in another shape's favourite next to that shape in its own
# ("a blue circle and a red square") never appeared in training: where binding and the leakage fix have a prior
# to fight. 30 steps at CFG 5 (how the model is evaluated).
# The compass encoder is trained against one UNet: the served folder's own (v3's once committed).
MICROWORLD_WEIGHTS = served_weights() or WEIGHTS_V2
MICROWORLD_COMPASS = str(MICROWORLD_WEIGHTS / "compass") if (
    MICROWORLD_WEIGHTS / "compass" / "compass_config.json").is_file() else "phrase"
# Seeds picked from 0-5 by benchmarks/microworld_v2_examples.py on the CPU (off vs on,
# results/microworld_v2_examples_cpu.json and .png): binding swaps the prior's colours back to the asked ones at seed
# 1 (binding score 0 -> 1; after the per-image entropy refinement 1 of 6 seeds improves, seed 3 worsens), LPA changes
# no seed visibly (seed 2 is a clean scene), the leakage fix (each item at its own positions) gives the swapped pair
# its asked colours at seeds 1-3 (binding 0 -> 1; the baseline swaps them at every seed), and compass with the trained
# encoder (MICROWORLD_COMPASS) turns the arrow from pointing down to a clean arrow pointing left at seed 0 (heading
# error 108 -> 2 deg; 5 of 6 seeds get closer, though at seed 3 the arrow fuses with a second red disc, and seed 5
# turns away: 10 -> 179 deg).
# Over 300 (prompt, seed) units per control on the GPU (results/control_effect_v2.json): compass cuts the heading
# error 93 -> 46 deg (95 % CI of the difference [-57, -38]), binding lowers the binding score 0.30 -> 0.22 (CI [-0.12,
# -0.05]), LPA and the leakage fix (then placed as in the paper) change nothing measurable (CIs include zero), and
# the oracle binding gain gate fails (-0.013, CI [-0.047, 0.022], 160 units); that binding row predates the per-image
# entropy refinement.
MICROWORLD_EXAMPLES = [
    ImageExample("a red circle and a blue square", seed=0, cfg=5.0),
    ImageExample("a [blue circle] and a [red square]", binding=True, seed=1, cfg=5.0),
    ImageExample("a yellow star and a green arrow, in dotted style", lpa=True, seed=2, cfg=5.0),
    ImageExample("a red square and a blue circle", isolate="red square, blue circle", seed=1, cfg=5.0),
    ImageExample("a green arrow and a red circle", seed=0, cfg=5.0, compass_encoder=MICROWORLD_COMPASS,
                 compass=json.dumps([{"name": "arrow", "angle": 270, "box": [0.05, 0.3, 0.5, 0.75]}])),
    ImageExample("a striped blue square and a green arrow pointing up", heatmap_words="square, arrow", seed=0,
                 cfg=5.0),
]
PHOTO_EXAMPLES = [
    ImageExample("a [red hat] and a [blue car]", binding=True),
    ImageExample("a white cat and a black dog, a castle in watercolor style", lpa=True),
    ImageExample("a pool by a table", isolate="pool"),
    ImageExample("a car on a street", compass=json.dumps([{"name": "car", "angle": 90, "box": [0.1, 0.4, 0.9, 0.9]}])),
    ImageExample("a mountain lake at sunrise, detailed", merge_ratio=0.5),
    ImageExample("a red hat and a blue car", heatmap_words="hat, car"),
]
PLACEHOLDERS = {  # prompt, heatmap words, items to encode alone: per model family
    True: ("a [blue circle] and a [red square], in striped style", "circle, square", "blue circle"),
    False: ("a [red hat] and a [blue car] in watercolor style", "hat, car", "pool"),
}
AB_INFO = ("Rendered only when a control is on (binding, LPA, leakage fix, compass or merging): with every control "
           "off the image already is the baseline.")
MICROWORLD_MERGE_INFO = ("Off for the micro-world model: its largest attention grid is 32×32 = 1,024 tokens, "
                         f"far below the {DEFAULT_MIN_TOKENS:,} tokens where merging starts to pay, "
                         "so nothing would merge.")


def model_controls(name: str | None) -> tuple[dict, ...]:
    """Updates for the picked model: its examples shown (micro-world or photo), token merging off with the reason
    where the model cannot use it, placeholders in its vocabulary. Order: micro-world examples, photo examples,
    merge ratio, prompt, heatmap words, leakage-fix items."""
    microworld = name == MICROWORLD_MODEL
    merge = (gr.update(interactive=False, value=0.0, info=MICROWORLD_MERGE_INFO) if microworld
             else gr.update(interactive=True, info=None))
    placeholders = (gr.update(placeholder=text) for text in PLACEHOLDERS[microworld])
    return gr.update(visible=microworld), gr.update(visible=not microworld), merge, *placeholders


def opened_accordions(binding: bool, lpa: bool, style: str, isolate: str, compass: str, ratio: float) -> tuple:
    """After an example loads: open each accordion whose controls it turned on, so no setting changes unseen.
    Order: binding, LPA, leakage fix, compass, merging."""
    return tuple(gr.update(open=True) if on else gr.skip()
                 for on in (binding, lpa or bool(style), bool(isolate), bool(compass), bool(ratio)))


@dataclass
class TokenControls:
    """The token-control accordions' widgets: what the request reads, what an example sets, what it opens."""

    boxes: list[gr.Accordion]  # binding, LPA, leakage fix, compass, merging: the order opened_accordions updates
    binding: gr.Checkbox
    ets_step: gr.Number
    lpa: gr.Checkbox
    style: gr.Textbox
    window: tuple[gr.Number, gr.Number]
    isolate: gr.Textbox
    compass_table: gr.Dataframe
    compass_json: gr.Textbox
    compass_encoder: gr.Textbox
    compass_preview: gr.Image
    merge_ratio: gr.Slider


def token_controls(microworld: bool, isolate_hint: str) -> TokenControls:
    """One closed accordion per token control: binding, LPA, the leakage fix, compass and token merging."""
    with gr.Accordion("Semantic binding (ToMe)", open=False, elem_id="image-binding") as binding_box:
        binding = gr.Checkbox(label="Bind attributes to objects", value=False,
                              info="Groups: [red hat] syntax, else found automatically")
        ets_step = gr.Number(label="End-token substitution step (-1 = off)", value=-1, precision=0,
                             minimum=-1, maximum=MAX_STEPS - 1, info="A denoising step below Steps")
    with gr.Accordion("Local Prompt Adaptation (LPA)", open=False, elem_id="image-lpa") as lpa_box:
        lpa = gr.Checkbox(label="Route content and style tokens", value=False,
                          info="Style from '... in X style' or the field below")
        style = gr.Textbox(label="Style (optional)", placeholder="watercolor")
        window = lpa_window_row("Window")
    with gr.Accordion("Leakage fix (Follow the Flow)", open=False, elem_id="image-leakfix") as leak_box:
        isolate = gr.Textbox(label="Items to encode alone (comma-separated)", placeholder=isolate_hint,
                             info="Each item re-encoded without the words before it, at its own place in the prompt")
    with gr.Accordion("Compass Control (object orientation)", open=False, elem_id="image-compass") as compass_box:
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
    with gr.Accordion("Token merging for speed", open=False, elem_id="image-merging") as merge_box:
        merge_ratio = gr.Slider(0.0, 0.75, value=0.0, step=0.05, label="Merge ratio r (0 = off)",
                                elem_id="image-merge-ratio", interactive=not microworld,
                                info=MICROWORLD_MERGE_INFO if microworld else None)
    return TokenControls([binding_box, lpa_box, leak_box, compass_box, merge_box], binding, ets_step, lpa, style,
                         window, isolate, compass_table, compass_json, compass_encoder, compass_preview, merge_ratio)


def example_sets(inputs: list, boxes: list[gr.Accordion], microworld: bool) -> list[gr.Dataset]:
    """The micro-world and the photo examples (the default model's shown); loading one opens the accordions of the
    controls it turned on. ``inputs`` are what ``ImageExample.row`` fills."""
    datasets = []
    for examples, label, for_microworld in ((MICROWORLD_EXAMPLES, "Examples for the micro-world model", True),
                                            (PHOTO_EXAMPLES, "Examples", False)):
        example_set = gr.Examples(
            [e.row() for e in examples], inputs=inputs, example_labels=[e.label() for e in examples],
            label=f"{label} (each sets the controls it lists and turns the others off; also steps, CFG and seed)",
            visible=microworld == for_microworld,
            elem_id=f"image-examples-{'microworld' if for_microworld else 'photo'}")
        example_set.load_input_event.then(opened_accordions, inputs=inputs[1:7], outputs=boxes,
                                          api_visibility="private", queue=False)
        datasets.append(example_set.dataset)
    return datasets


def image_generator(pipeline: ImagePipeline) -> Callable[..., Iterator[tuple]]:
    """/generate_image's handler: the UI's values as an ImageRequest; previews, then the tab's outputs."""

    @on_gpu
    def generate_image(prompt_text, negative_text, model_name, scheduler_name, steps_value, cfg_value, width_value,
                       height_value, batch_value, seed_value, compare_value, binding_value, ets_value, lpa_value,
                       style_text, low_value, high_value, isolate_text, ratio_value, heatmap_text,
                       compass_text, compass_choice, fast_value, request: gr.Request) -> Iterator[tuple]:
        image_request = ImageRequest(
            prompt=prompt_text, negative_prompt=negative_text or "", model=model_name or "",
            scheduler=scheduler_name or "default", steps=int(number(steps_value, 30)), cfg=number(cfg_value, 7.5),
            width=int(number(width_value, 0)), height=int(number(height_value, 0)),
            batch_size=int(number(batch_value, 1)), seed=int(number(seed_value, -1)),
            compare="controls off" if compare_value else NO_COMPARISON,
            binding=bool(binding_value), ets_step=int(number(ets_value, -1)), lpa=bool(lpa_value),
            style=style_text or "", lpa_window=lpa_window(low_value, high_value),
            isolate=isolate_text or "", merge_ratio=number(ratio_value, 0.0), heatmap_words=heatmap_text or "",
            compass=compass_text or "", compass_encoder=compass_choice or "phrase",
            fast=True if fast_value is None else bool(fast_value),
        )
        yield from tab_outputs(run_pipeline(pipeline, image_request, request), 4, result_outputs, lambda value: value)

    return generate_image


def result_outputs(result: Result) -> tuple:
    """The images, the A/B baseline's, both sides' heatmaps and the stats."""
    baseline = result.baseline
    heat = result.metadata["heatmaps"] + (baseline.metadata["heatmaps"] if baseline else [])
    return result.value, baseline.value if baseline else [], [tuple(h) for h in heat], result.stats


def build(pipeline: ImagePipeline) -> None:
    """The image tab: prompt and results on the left; model, sampling and the token controls on the right."""
    notice = tab_notices(pipeline)
    default_model = pipeline.default_model_name()
    microworld = default_model == MICROWORLD_MODEL
    prompt_hint, heatmap_hint, isolate_hint = PLACEHOLDERS[microworld]
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="image-prompt", placeholder=prompt_hint)
            negative = gr.Textbox(label="Negative prompt", lines=1)
            generate, stop = run_buttons("image")
            with gr.Row():
                images = gr.Gallery(label="Controlled (or plain when no control is on)", type="filepath",
                                    format="png", columns=2, elem_id="image-output")
                baseline = gr.Gallery(label="Baseline (A/B): same seed, controls off; only when a control is on",
                                      type="filepath", format="png", columns=2, elem_id="image-baseline")
            heatmaps = gr.Gallery(label="Cross-attention heatmaps", type="filepath", format="png", columns=4)
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=default_model, label="Model", elem_id="image-model",
                                allow_custom_value=True, info="A listed model, a Hub id or a local folder")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Scheduler")
            steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
            cfg = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="CFG scale")
            width, height = size_row(2048)
            batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size")
            seed = seed_row()
            compare = gr.Checkbox(label="A/B: also render the baseline with the same seed", value=True, info=AB_INFO,
                                  elem_id="image-compare")
            tokens = token_controls(microworld, isolate_hint)
            heatmap_words = gr.Textbox(label="Heatmap words (comma-separated)", placeholder=heatmap_hint)
            fast = gr.Checkbox(label="Fast path (captured UNet loop)", value=True,
                               info="CUDA graphs on a GPU, controls and merging kept; capture_s in the stats "
                                    "the first time; eager on CPU and ZeroGPU")
            stats = stats_panel()
    datasets = example_sets([prompt, tokens.binding, tokens.lpa, tokens.style, tokens.isolate, tokens.compass_json,
                             tokens.merge_ratio, heatmap_words, tokens.compass_encoder, steps, cfg, seed],
                            tokens.boxes, microworld)
    inputs = [prompt, negative, model, scheduler, steps, cfg, width, height, batch, seed, compare, tokens.binding,
              tokens.ets_step, tokens.lpa, tokens.style, *tokens.window, tokens.isolate, tokens.merge_ratio,
              heatmap_words, tokens.compass_json, tokens.compass_encoder, fast]
    outputs = [images, baseline, heatmaps, stats]
    wire_generate("image", generate, stop, image_generator(pipeline), inputs, outputs, outputs, stats)
    wire_compass(tokens)
    link_seed_reuse(seed, stats)
    model.change(model_controls, inputs=model, outputs=[*datasets, tokens.merge_ratio, prompt, heatmap_words,
                                                        tokens.isolate], api_visibility="private", queue=False)
    refresh_availability(pipeline, notice, generate, {model: pipeline.model_choices})


def wire_compass(tokens: TokenControls) -> None:
    """The objects table writes the JSON the API takes; the JSON draws the preview of boxes and headings."""
    tokens.compass_table.input(compass_rows_to_json, inputs=tokens.compass_table, outputs=tokens.compass_json,
                               api_visibility="private")
    tokens.compass_json.change(compass_preview_image, inputs=tokens.compass_json, outputs=tokens.compass_preview,
                               api_visibility="private")


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

