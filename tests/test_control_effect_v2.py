"""The micro-world v2 control-effect benchmark: its paired statistics on tiny inputs, its units and prompts, the
scorer's refusal of noise and clutter, and the committed v2 model served by the image tab's pipeline."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def load_benchmark(name: str):
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def effect():
    return load_benchmark("control_effect_v2")


def test_paired_difference_its_interval_and_the_better_side(effect):
    off, on = np.array([0.0, 0.0, 0.5, 0.5]), np.array([1.0, 1.0, 1.0, 1.0])
    up = effect.paired(off, on, better=1, resamples=200)
    assert up["difference"] == pytest.approx(0.75) and up["off"] == 0.25 and up["on"] == 1.0 and up["n"] == 4
    assert 0.5 <= up["ci95"][0] <= up["ci95"][1] <= 1.0 and up["excludes_zero"] and up["improves"]
    down = effect.paired(off, on, better=-1, resamples=200)  # the same rise of a lower-is-better metric (leakage)
    assert down["excludes_zero"] and not down["improves"]
    flat = effect.paired(np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 1.0]), better=1, resamples=200)
    assert flat["difference"] == 0 and flat["ci95"][0] < 0 < flat["ci95"][1] and not flat["excludes_zero"]


def test_units_without_a_value_on_either_side_leave_that_metric(effect):
    off = np.array([10.0, math.nan, 80.0, 40.0])  # heading error: no arrow found in unit 1 off, unit 3 on
    on = np.array([5.0, 3.0, 20.0, math.nan])
    stats = effect.paired(off, on, better=-1, resamples=100)
    assert stats["n"] == 2 and stats["off"] == 45.0 and stats["on"] == 12.5 and stats["difference"] == -32.5
    empty = effect.paired(np.array([math.nan]), np.array([1.0]), better=1, resamples=100)
    assert empty["n"] == 0 and math.isnan(empty["difference"]) and not empty["excludes_zero"]


def test_validity_keeps_the_control_to_95_percent_of_the_baseline(effect):
    runs = lambda values: [{"valid": v} for v in values]  # noqa: E731
    kept = effect.validity(runs([1, 1, 1, 1]), runs([1, 1, 1, 1]))
    assert kept == {"off": 1.0, "on": 1.0, "ratio": 1.0, "kept": True}
    lost = effect.validity(runs([1, 1, 1, 1]), runs([1, 1, 1, 0]))
    assert lost["ratio"] == 0.75 and not lost["kept"]


@pytest.mark.parametrize("control", ["binding", "lpa", "leakfix"])
def test_plan_makes_the_asked_number_of_distinct_units_in_served_batches(effect, control):
    jobs = effect.plan(control, 45, 8, encoder="")
    assert sum(j.batch for j in jobs) == 45 and all(1 <= j.batch <= 8 for j in jobs)
    units = {(j.prompt.fields["prompt"], j.seed + k) for j in jobs for k in range(j.batch)}
    assert len(units) == 45


def test_binding_and_leakfix_prompts_are_the_held_out_swaps(effect):
    from pipelines.diffusion.prompts import parse_prompt
    from pipelines.microworld.scenes_v2 import FAVOURITE

    binding, leakfix = effect.binding_prompts(), effect.leakfix_prompts()
    assert binding[0].fields == {"prompt": "a [blue circle] and a [red square]", "binding": True}
    assert leakfix[0].fields == {"prompt": "a blue circle and a red square", "isolate": "blue circle, red square"}
    for prompt in binding:
        groups = parse_prompt(prompt.fields["prompt"]).groups
        assert [g.phrase for g in groups] == [f"{o['colour']} {o['shape']}" for o in prompt.truth["objects"]]
        first, second = prompt.truth["objects"]
        assert first["colour"] == FAVOURITE[second["shape"]] and second["colour"] == FAVOURITE[first["shape"]]


def test_lpa_prompts_name_one_style_that_every_object_should_wear(effect):
    from pipelines.diffusion.prompts import parse_prompt

    for prompt in effect.lpa_prompts(9):
        styles = {o["style"] for o in prompt.truth["objects"]}
        assert len(prompt.truth["objects"]) == 2 and len(styles) == 1
        assert parse_prompt(prompt.fields["prompt"]).style.text == styles.pop() and prompt.fields["lpa"]


def test_compass_prompts_give_the_arrow_heading_and_box_but_the_caption_does_not(effect):
    from pipelines.microworld.compass_v2 import compass_angle

    for prompt in effect.compass_prompts(6, "ENC"):
        spec = json.loads(prompt.fields["compass"])[0]
        arrow = prompt.truth["objects"][0]
        assert arrow["shape"] == "arrow" and "pointing" not in prompt.fields["prompt"]
        assert spec["angle"] == pytest.approx(compass_angle(arrow["heading"]), abs=0.01)
        x0, y0, x1, y1 = spec["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and prompt.fields["compass_encoder"] == "ENC"


def test_clutter_on_the_ground_is_refused_though_most_pixels_are_ground():
    """Dense palette blobs on the ground colour pass the ground check; each fits a shape as well as a generated
    object does, so only the clutter check (more than 6 objects) keeps them from scoring."""
    from pipelines.microworld import scenes_v2
    from pipelines.microworld.scorer_v2 import MIN_BACKGROUND, ground_share, score_image

    gates = load_benchmark("microworld_v2_gates")
    layouts = scenes_v2.sample_layouts(8, 5)
    images, coverage = scenes_v2.render_layouts(layouts)
    truths = scenes_v2.truths(layouts, coverage)
    blobs = gates.noise_images(16, 128)[3::4]
    for image, truth in zip(blobs, truths):
        assert ground_share(image.astype(np.float32)) >= MIN_BACKGROUND
        score = score_image(image, truth)
        assert score["valid"] == 0 and score["presence"] == 0 and score["binding"] == 0
    drawn = [score_image(image, truth) for image, truth in zip(scenes_v2.to_uint8(images), truths)]
    assert all(s["valid"] == 1 for s in drawn) and np.mean([s["presence"] for s in drawn]) > 0.95


def test_v2_is_the_packaged_microworld_model_and_generates_on_the_served_path(tmp_path, monkeypatch):
    from pipelines import microworld
    from pipelines.base import Result
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_MODEL
    from pipelines.tabs.image import ImagePipeline, ImageRequest

    store = ModelStore(device=torch.device("cpu"))
    pipeline = ImagePipeline(store, "auto")
    spec = pipeline.spec_for(MICROWORLD_MODEL)
    if microworld.packaged_model_folder() is None:
        pytest.skip("pipelines/microworld/weights_v2 is not committed in this checkout")
    resolved = store.resolve(spec)
    assert resolved.source == "package" and Path(resolved.location) == microworld.WEIGHTS_V2
    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    request = ImageRequest(prompt="a blue circle and a red square", model=MICROWORLD_MODEL, steps=1, cfg=5.0,
                           seed=0, preview_every=0)
    result = next(e for e in pipeline.generate(request) if isinstance(e, Result))
    image = Image.open(result.value[0])
    assert image.size == (128, 128) and result.stats["model"] == MICROWORLD_MODEL  # 128 px native, from the spec
    monkeypatch.setattr(microworld, "WEIGHTS_V2", tmp_path / "missing")
    assert not ModelStore(device=torch.device("cpu")).available(spec)


def test_one_object_in_two_hues_counts_once_and_separate_objects_stay_apart():
    """A generated object often comes out in two neighbouring hues (red and orange stripes): each hue's component
    fills the same outline. It is one object, not one asked and one extra."""
    from pipelines.microworld import scenes_v2
    from pipelines.microworld.scenes import PALETTE
    from pipelines.microworld.scorer_v2 import score_image

    layouts = scenes_v2.sample_layouts(1, 0)
    layouts.count[:] = 2
    layouts.shape[0, :2] = [scenes_v2.SHAPES.index("circle"), scenes_v2.SHAPES.index("square")]
    layouts.colour[0, :2] = [scenes_v2.COLOURS.index("red"), scenes_v2.COLOURS.index("blue")]
    layouts.style[0, :2] = 0
    layouts.center[0, :2], layouts.radius[0, :2] = [(36, 64), (94, 64)], 22
    images, coverage = scenes_v2.render_layouts(layouts)
    image = scenes_v2.to_uint8(images)[0].copy()
    stripes = (coverage[0, 0].numpy() > 0.5) & (np.arange(128)[None, :] % 2 == 0)
    image[stripes] = PALETTE["orange"]
    truth = {"objects": [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}]}
    score = score_image(image, truth)
    assert len(score["detections"]) == 2 and score["presence"] == 1.0 and score["extra_objects"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_serves_batches_of_eight_from_captured_graphs_on_the_gpu(tmp_path):
    """What the 300-unit run's time rests on: A/B requests of 8 seeds replayed as CUDA graphs, scored in workers."""
    effect = load_benchmark("control_effect_v2")
    report = effect.main(["--units", "16", "--steps", "10", "--controls", "leakfix,lpa", "--no-gates",
                          "--workers", "2", "--images", str(tmp_path / "images"), "--json", str(tmp_path / "e.json")])
    for row in report["rows"]:
        served = row["served"]
        assert served["requests"] == 2 and row["units"] == 16 and served["fast"] == ["graph"]
        assert served["graph_replays"] > 0 and served["eager_unet_calls"] == 0
