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


@pytest.mark.parametrize("objects, message", [("[{", "must be JSON"), ('[{"name": "boat", "angle": 0}]', "does not appear")])
def test_generate_image_rejects_bad_compass_objects(tiny_client, objects, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(tiny_client, compass=objects)
