"""The image tab through the API, as gradio_client users call it (tiny preset)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

BASE = dict(prompt="a [red hat] and a [blue car] in watercolor style", negative="", model="tiny-sd15 (random weights)",
            scheduler="Euler", steps=3, cfg=7.5, width=0, height=0, batch=1, seed=7, compare=True, binding=False,
            ets=0, lpa=False, style="", low=300, high=650, isolate="", ratio=0.0, heat="", compass="",
            compass_encoder="phrase")


def call(client, **changes):
    args = {**BASE, **changes}
    return client.predict(*args.values(), api_name="/generate_image")


def first_path(gallery) -> str:
    item = gallery[0]
    image = item["image"] if isinstance(item, dict) else item
    return image["path"] if isinstance(image, dict) else image


@pytest.mark.parametrize("control", [dict(), dict(binding=True), dict(lpa=True, steps=10),
                                     dict(isolate="car"), dict(heat="hat, car")])
def test_generate_image_answers_with_each_control(tiny_client, control):
    images, baseline, heatmaps, stats = call(tiny_client, **control)
    parameters = json.loads(Image.open(first_path(images)).text["parameters"])
    assert parameters["seed"] == 7 and parameters["scheduler"] == "Euler"
    assert stats["seed"] == 7 and stats["steps_per_s"] > 0
    controlled = bool(control.get("binding") or control.get("lpa") or control.get("isolate"))
    assert bool(baseline) == controlled
    assert len(heatmaps) == (2 if control.get("heat") else 0)  # one per word; heatmaps alone change nothing
    if control.get("lpa"):
        assert stats["biased_attention_calls"] > 0
    if control.get("binding"):
        assert stats["binding_groups"] == 2


def test_generate_image_rejects_lpa_without_style(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="LPA needs a style"):
        call(tiny_client, prompt="a red hat", lpa=True)


def test_generate_image_with_compass_objects_confines_their_tokens(tiny_client):
    objects = json.dumps([{"name": "hat", "angle": 90, "box": [0, 0, 0.5, 0.5]},
                          {"name": "car", "angle": 270, "box": [0.5, 0.5, 1, 1]}])
    images, baseline, heatmaps, stats = call(tiny_client, compass=objects, heat="hat")
    parameters = json.loads(Image.open(first_path(images)).text["parameters"])
    assert "<compass-0> hat" in parameters["prompt_used"] and "<compass-1> car" in parameters["prompt_used"]
    assert [o["name"] for o in parameters["controls"]["compass"]] == ["hat", "car"]
    assert baseline and stats["biased_attention_calls"] > 0


@pytest.mark.parametrize("objects, message", [("[{", "must be JSON"),
                                              ('[{"name": "boat", "angle": 0}]', "does not appear")])
def test_generate_image_rejects_bad_compass_objects(tiny_client, objects, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(tiny_client, compass=objects)


def test_microworld_examples_stay_in_its_vocabulary_and_show_every_control():
    import re

    from components.image_tab import MICROWORLD_EXAMPLES
    from pipelines.microworld.scenes import DIRECTIONS
    from pipelines.microworld.scenes_v2 import FAVOURITE, vocabulary

    allowed = {*vocabulary(), *DIRECTIONS}
    for example in MICROWORLD_EXAMPLES:
        words = set(re.findall(r"[a-z-]+", example.prompt.lower()))
        assert words <= allowed, f"{example.prompt}: {sorted(words - allowed)} are not micro-world v2 words"
    shown = {field for example in MICROWORLD_EXAMPLES for field in ("binding", "lpa", "isolate", "compass",
                                                                     "heatmap_words") if getattr(example, field)}
    assert shown == {"binding", "lpa", "isolate", "compass", "heatmap_words"}  # merging is off on this model
    assert any(not e.binding and not e.lpa and not e.isolate and not e.compass for e in MICROWORLD_EXAMPLES)
    held_out = {f"{FAVOURITE[b]} {a}" for a in FAVOURITE for b in FAVOURITE if a != b}
    for example in (e for e in MICROWORLD_EXAMPLES if e.binding or e.isolate):  # a prior to fight: held-out pairs
        assert any(pair in example.prompt for pair in held_out), example.prompt


def test_examples_list_their_settings_and_open_the_accordions_they_change():
    from components.image_tab import MICROWORLD_EXAMPLES, PHOTO_EXAMPLES, opened_accordions

    lpa = next(e for e in PHOTO_EXAMPLES if e.lpa)
    assert lpa.label() == f"LPA on · {lpa.prompt}"  # settings first: a long prompt is cut at its end, not them
    assert MICROWORLD_EXAMPLES[0].label().startswith("Every control off · ")
    compass = next(e for e in MICROWORLD_EXAMPLES if e.compass)
    assert compass.label().startswith("Compass: arrow at 270°")
    binding, lpa_box, leak, compass, merge = opened_accordions(False, True, "", "pool", "", 0.0)
    assert lpa_box == {"open": True, "__type__": "update"} and leak["open"] is True
    assert all(not isinstance(update, dict) or "open" not in update for update in (binding, compass, merge))


def test_picking_the_microworld_model_swaps_examples_and_turns_merging_off_with_the_reason():
    from components.image_tab import model_controls
    from pipelines.presets import MICROWORLD_MODEL

    micro, photo, merge, prompt, heatmaps, isolate = model_controls(MICROWORLD_MODEL)
    assert micro["visible"] and not photo["visible"]
    assert merge["interactive"] is False and merge["value"] == 0.0 and "nothing would merge" in merge["info"]
    assert "square" in prompt["placeholder"] and "hat" not in heatmaps["placeholder"]  # hints in its vocabulary
    micro, photo, merge, prompt, heatmaps, isolate = model_controls("Stable Diffusion 1.5")
    assert not micro["visible"] and photo["visible"] and merge["interactive"] is True
    assert "hat" in prompt["placeholder"]


def test_offline_image_tab_opens_on_the_microworld_model_with_its_examples(hub_offline_empty_cache):
    import gradio as gr

    from app import build_demo
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_MODEL
    from pipelines.tabs.image import ImagePipeline

    store = ModelStore(packaged={}, installed={"microworld": lambda: True})
    demo = build_demo({"image": ImagePipeline(store, "auto")})
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["image-model"].value == MICROWORLD_MODEL
    labels = dict((value, label) for label, value in blocks["image-model"].choices)
    assert labels[MICROWORLD_MODEL].endswith("available here")
    assert labels["Stable Diffusion 1.5"].endswith("needs a download (Hub unreachable)")
    assert blocks["image-examples-microworld"].visible and not blocks["image-examples-photo"].visible
    assert "only when a control is on" in blocks["image-compare"].info
    assert blocks["image-merge-ratio"].interactive is False
    notice = next(b for b in demo.blocks.values() if isinstance(b, gr.Markdown) and "tw-unavailable" in b.elem_classes)
    assert notice.visible is False  # the micro-world model runs here


@pytest.mark.slow
def test_every_microworld_example_runs_on_the_trained_model_with_its_control_at_work(tmp_path, monkeypatch):
    from dataclasses import asdict

    from components.image_tab import MICROWORLD_EXAMPLES
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_MODEL
    from pipelines.tabs.image import ImagePipeline, ImageRequest

    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    pipeline = ImagePipeline(ModelStore(), "auto")
    if not pipeline.store.availability(pipeline.spec_for(MICROWORLD_MODEL)).here:
        pytest.skip("the micro-world v2 weights are missing")
    for example in MICROWORLD_EXAMPLES:
        settings = {k: v for k, v in asdict(example).items() if k != "steps"}
        result = pipeline.run(ImageRequest(model=MICROWORLD_MODEL, steps=2, compare="controls off", **settings))
        controlled = bool(example.binding or example.lpa or example.isolate or example.compass)
        assert (result.baseline is not None) == controlled, example.prompt
        controls = result.metadata["controls"]
        assert bool(controls) == controlled, (example.prompt, controls)
        assert len(result.metadata["heatmaps"]) == len([w for w in example.heatmap_words.split(",") if w.strip()])
