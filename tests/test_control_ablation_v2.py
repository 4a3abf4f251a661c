"""The control ablation's variants and probes reach the served request path and leave the served defaults alone."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.diffusion.attention import AttentionControl
from pipelines.diffusion.binding import BindingConfig, attribute_free_prompt
from pipelines.diffusion.controls import ControlPlan
from pipelines.diffusion.leakfix import isolate_items
from pipelines.diffusion.lpa import LPAConfig
from pipelines.diffusion.prompts import encode_positive, parse_prompt, token_positions
from pipelines.models import ModelStore
from pipelines.tabs.image import ImageRequest
from pipelines.tiny import tiny_sd15_pipeline


@pytest.fixture(scope="module")
def ablation():
    return importlib.import_module("benchmarks.control_ablation_v2")


def test_lpa_variant_reaches_the_plan_with_the_requests_window_and_the_defaults_come_back(ablation):
    request = ImageRequest(prompt="a red circle, in dotted style", lpa=True, lpa_window=(0, 1000))
    with ablation.config_variant("lpa", {"causal_style": True, "style_tags": ("up1", "up2"), "lpa_window": (0, 1)}):
        inside = ControlPlan.from_request(request).lpa
    assert inside.causal_style and inside.style_tags == ("up1", "up2") and inside.window == (0.0, 1000.0)
    assert ControlPlan.from_request(request).lpa == LPAConfig(window=(0.0, 1000.0))
    assert not LPAConfig().causal_style and LPAConfig().style_tags == ("up2",)
    with pytest.raises(ValueError, match="no config"):
        with ablation.config_variant("leakfix", {"causal_style": True}):
            pass


def test_every_variant_names_config_or_request_fields_and_the_first_is_served(ablation):
    for control, variants in ablation.VARIANTS.items():
        fields = set(ablation.CONFIGS[control].__dataclass_fields__) if control in ablation.CONFIGS else set()
        assert list(variants)[0] == "served" and variants["served"] == {}
        assert all(set(o) <= fields | set(ablation.REQUEST_FIELDS) for o in variants.values()), control
    assert set(ablation.VARIANTS["binding"]["ets0"]) <= set(BindingConfig.__dataclass_fields__)


def prepared(ablation, probe: str) -> tuple[dict, AttentionControl, torch.Tensor, int]:
    pipeline = ablation.DiagnosticPipeline(ModelStore(packaged={}), "tiny")
    pipe = tiny_sd15_pipeline()
    text = "a purple circle and a red star"
    request = ablation.DiagnosticRequest(prompt=text, probe=probe, width=32, height=32, cfg=5.0)
    control, call, info = AttentionControl(pipe.unet), {}, {}
    pipeline.prepare_controls(pipe, "sd15", request, parse_prompt(text), control, call, info)
    assert info["controls"]["probe"] == probe and request.controlled
    return call, control, encode_positive(pipe, text, 1), len(pipe.tokenizer(text)["input_ids"]) - 1


def test_end_token_probes_touch_the_end_tokens_only(ablation):
    call, control, plain, end = prepared(ablation, "end_tokens_off")
    assert torch.equal(call["prompt_embeds"], plain)
    assert [b.tokens for b in control.biases] == [list(range(end, 77))] and control.biases[0].layers is None
    call, control, plain, end = prepared(ablation, "end_tokens_attribute_free")
    assert not control.biases and torch.equal(call["prompt_embeds"][:, :end], plain[:, :end])
    assert not torch.allclose(call["prompt_embeds"][:, end:], plain[:, end:])


def test_neutral_context_keeps_each_items_place_and_drops_earlier_attributes(ablation):
    pipe = tiny_sd15_pipeline()
    text, context = "a purple circle and a red star", "a circle and a red star"
    plain = encode_positive(pipe, text, 1)
    assert attribute_free_prompt(parse_prompt(text), text.index("red")) == "a circle and a"
    first = token_positions(pipe.tokenizer, text, 2, text.index(" and"))
    second = token_positions(pipe.tokenizer, text, text.index("red"), len(text))
    inside = token_positions(pipe.tokenizer, context, context.index("red"), len(context))
    patched = isolate_items(pipe, text, ["purple circle", "red star"], plain, ablation.in_neutral_context)[0]
    neutral, alone = encode_positive(pipe, context, 1), encode_positive(pipe, "red star", 1)
    assert torch.equal(patched[:, first], plain[:, first])  # causal: the first item comes out as in the prompt
    assert torch.equal(patched[:, second], neutral[:, inside])
    assert not torch.allclose(patched[:, second], plain[:, second])  # "purple" is gone from its context
    assert not torch.allclose(patched[:, second], alone[:, 1:1 + len(second)])  # "a circle and a" is not
    others = [i for i in range(plain.shape[1]) if i not in first + second]
    assert torch.equal(patched[:, others], plain[:, others])


def test_pixel_change_is_zero_for_the_same_picture_and_counts_moved_units(ablation, tmp_path):
    grey = np.full((8, 8, 3), 100, np.uint8)
    paths = []
    for name, delta in (("a", 0), ("b", 0), ("c", 3)):
        Image.fromarray(grey + delta).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    assert ablation.pixel_change(paths[:1], paths[1:2]) == {"mean_abs": 0.0, "share_over_one_level": 0.0}
    assert ablation.pixel_change(paths[:2], [paths[1], paths[2]]) == {"mean_abs": 1.5, "share_over_one_level": 0.5}


def test_leakage_by_object_reads_each_asked_object_in_prompt_order(ablation, tmp_path):
    from pipelines.microworld import scenes_v2

    layouts = scenes_v2.sample_layouts(64, 7)
    i = next(k for k in range(len(layouts)) if layouts.count[k] == 2 and layouts.shape[k, 0] != layouts.shape[k, 1]
             and layouts.style[k, 0] == layouts.style[k, 1] == 0)
    images, _ = scenes_v2.render_layouts(layouts)
    path = tmp_path / "scene.png"
    Image.fromarray(scenes_v2.to_uint8(images)[i]).save(path)
    drawn = [{"shape": o["shape"], "colour": o["colour"]} for o in layouts.objects(i)]
    traded = [{**drawn[0], "colour": drawn[1]["colour"]}, {**drawn[1], "colour": drawn[0]["colour"]}]
    other = next(c for c in scenes_v2.COLOURS if c not in {drawn[0]["colour"], drawn[1]["colour"]})
    first_leaks = [{**drawn[0], "colour": other}, {**drawn[1], "colour": drawn[0]["colour"]}]
    assert ablation.leakage_by_object([str(path)], [{"objects": drawn}]) == [0.0, 0.0]
    assert ablation.leakage_by_object([str(path)], [{"objects": traded}]) == [1.0, 1.0]
    assert ablation.leakage_by_object([str(path)] * 2, [{"objects": first_leaks}, {"objects": drawn}]) == [0.5, 0.0]
