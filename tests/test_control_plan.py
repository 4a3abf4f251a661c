"""The control plan shared by the image and video tabs (issue 24 item 4): one reading of a request's token controls,
defaults from each technique's config dataclass, the same errors in both tabs."""
from __future__ import annotations

import pytest
import torch

from pipelines.base import PipelineError
from pipelines.diffusion.attention import AttentionControl
from pipelines.diffusion.binding import BindingConfig
from pipelines.diffusion.controls import ControlPlan
from pipelines.diffusion.lpa import LPAConfig
from pipelines.diffusion.prompts import encode_positive, parse_prompt
from pipelines.tabs.image import ImageRequest
from pipelines.tabs.video import VideoRequest
from pipelines.tiny import tiny_sd15_pipeline


def test_requests_take_their_defaults_from_the_techniques_configs():
    assert ImageRequest().lpa_window == VideoRequest().lpa_window == LPAConfig().window == (300.0, 650.0)
    assert ImageRequest().ets_step == BindingConfig().ets_step
    assert not ControlPlan.from_request(ImageRequest()).active


@pytest.mark.parametrize("request_type", [ImageRequest, VideoRequest])
def test_image_and_video_requests_give_the_same_plan(request_type):
    request = request_type(binding=True, lpa=True, lpa_window=(100, 700), isolate=" pool, ,table")
    plan = ControlPlan.from_request(request)
    assert plan.binding == BindingConfig() and plan.lpa == LPAConfig(window=(100.0, 700.0))
    assert plan.isolate == ("pool", "table") and plan.active
    with pytest.raises(PipelineError, match="LPA window must satisfy"):
        ControlPlan.from_request(request_type(lpa=True, lpa_window=(700, 100)))


def test_end_token_substitution_step_reaches_the_binding_config():
    assert ControlPlan.from_request(ImageRequest(binding=True, ets_step=0)).binding.ets_step == 0


def test_leakage_fix_is_strict_for_an_image_and_per_shot_for_a_video():
    pipe = tiny_sd15_pipeline()
    plan = ControlPlan(isolate=("pool", "castle"))
    text = "a pool by a table"
    positive = encode_positive(pipe, text, 1)
    with pytest.raises(PipelineError, match="'castle' does not occur"):
        plan.isolated(pipe, text, positive)
    patched, where = plan.isolated(pipe, text, positive, strict=False)
    assert list(where) == ["pool"] and not torch.equal(patched, positive)
    untouched, where = ControlPlan().isolated(pipe, text, positive)
    assert untouched is positive and where is None


def test_lpa_routing_reports_none_without_a_style_and_puts_rows_on_every_bias():
    pipe = tiny_sd15_pipeline()
    plan = ControlPlan(lpa=LPAConfig())
    control = AttentionControl(pipe.unet)
    assert plan.route_lpa(control, pipe.tokenizer, parse_prompt("a pool by a table")) is None and not control.biases
    report = plan.route_lpa(control, pipe.tokenizer, parse_prompt("a castle in watercolor style"), rows=slice(4, 8))
    assert report["style"] == "watercolor" and report["style_tokens"] and report["content_tokens"]
    assert control.biases and all(b.rows == slice(4, 8) and b.timesteps == (300.0, 650.0) for b in control.biases)



def test_lpa_causal_options_mask_what_has_read_the_style_or_the_content_only_when_asked():
    """In a causal encoder the words after the style and the end tokens have read it: with ``causal_style`` they are
    masked where the style words are (content layers), content words never; with ``causal_content`` style layers keep
    only the start token and the style words; nothing changes by default."""
    pipe = tiny_sd15_pipeline()
    text = "in watercolor style, a castle"
    end = len(pipe.tokenizer(text)["input_ids"]) - 1
    masked = {}
    for flag in (False, True):
        control = AttentionControl(pipe.unet)
        report = ControlPlan(lpa=LPAConfig(causal_style=flag)).route_lpa(control, pipe.tokenizer, parse_prompt(text))
        masked[flag] = {b.label: set(b.tokens) for b in control.biases}
        assert masked[flag]["lpa: content keys off on style layers"] == set(report["content_tokens"])
    style_words, content = masked[False]["lpa: style keys off on content layers"], masked[False][
        "lpa: content keys off on style layers"]
    assert style_words and max(style_words) < min(content) < end
    later = set(range(min(style_words), end)) - content
    assert later - style_words  # "style" and "," come after the style word and are not content
    assert masked[True]["lpa: style keys off on content layers"] == style_words | later | set(range(end, 77))
    assert not LPAConfig().causal_style and not LPAConfig().causal_content
    control = AttentionControl(pipe.unet)
    ControlPlan(lpa=LPAConfig(causal_content=True)).route_lpa(control, pipe.tokenizer, parse_prompt(text))
    masked = {b.label: set(b.tokens) for b in control.biases}
    assert masked["lpa: content keys off on style layers"] == set(range(1, 77)) - style_words
    assert masked["lpa: style keys off on content layers"] == style_words
