"""The image tab through the API, as gradio_client users call it (tiny preset)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

BASE = dict(prompt="a [red hat] and a [blue car] in watercolor style", negative="", model="tiny-sd15 (random weights)",
            scheduler="Euler", steps=3, cfg=7.5, width=0, height=0, batch=1, seed=7, compare=True, binding=False,
            ets=0, lpa=False, style="", low=300, high=650, isolate="", ratio=0.0, heat="")


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
