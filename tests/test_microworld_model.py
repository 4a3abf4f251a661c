"""Micro-world model: the training script writes a loadable SD pipeline folder with a BERT text encoder, every
image control runs on it through the image pipeline, and the control-effect benchmark runs end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base import Result
from pipelines.models import ModelStore
from pipelines.tabs.image import ImagePipeline, ImageRequest

TINY_ARGS = ["--device", "cpu", "--dtype", "fp32", "--text", "tiny", "--scenes", "48", "--workers", "1",
             "--vae-channels", "8,16,16", "--unet-channels", "16,16,16,16", "--layers-per-block", "1",
             "--heads", "2", "--norm-groups", "4", "--vae-steps", "3", "--steps", "3", "--batch", "4",
             "--vae-batch", "4", "--log-every", "1", "--no-samples"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from pipelines.microworld.train import parse_args, train

    out = tmp_path_factory.mktemp("microworld") / "run"
    return train(parse_args(TINY_ARGS + ["--out", str(out)]))


def test_training_writes_a_loadable_pipeline_folder(trained):
    from diffusers import StableDiffusionPipeline
    from transformers import BertModel

    report = json.loads((trained / "train_report.json").read_text())
    phases = [row.get("phase") for row in report["history"]]
    assert phases.count("vae") == 3 and phases.count("unet") == 3
    assert all(np.isfinite(row["loss"]) for row in report["history"] if "loss" in row)
    assert all(f.stat().st_size <= 15 * 2**20 for f in trained.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(trained)
    assert isinstance(pipe.text_encoder, BertModel) and pipe.text_encoder.config.use_attention_mask
    assert pipe.tokenizer.model_max_length == 77 and pipe.vae_scale_factor == 4
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the training latents
    image = pipe("a red star", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_resume_keeps_the_vae_and_continues_the_unet(trained, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipelines.microworld.train import parse_args, train

    resumed = train(parse_args(TINY_ARGS + ["--out", str(tmp_path / "resumed"), "--resume", str(trained)]))
    phases = [row.get("phase") for row in json.loads((resumed / "train_report.json").read_text())["history"]]
    assert "vae" not in phases and phases.count("unet") == 3
    before, after = (AutoencoderKL.from_pretrained(folder / "vae") for folder in (trained, resumed))
    assert after.config.scaling_factor == before.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    old, new = (UNet2DConditionModel.from_pretrained(folder / "unet") for folder in (trained, resumed))
    assert any(not torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def render(pipeline: ImagePipeline, **options) -> Result:
    request = ImageRequest(steps=2, seed=3, width=64, height=64, preview_every=0, fast=False, **options)
    return next(e for e in pipeline.generate(request) if isinstance(e, Result))


PROMPT = "a red arrow pointing left and a blue star, in striped style"


def test_controls_off_is_the_stock_pipeline_on_the_bert_model(trained, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    result = render(ImagePipeline(ModelStore(device=torch.device("cpu")), "auto"), model=str(trained), prompt=PROMPT)
    stock = StableDiffusionPipeline.from_pretrained(trained)
    expected = stock(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                     generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(Image.open(result.value[0])), np.asarray(expected))


def test_every_control_hooks_into_the_bert_model(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    pipeline = ImagePipeline(ModelStore(device=torch.device("cpu")), "auto")
    model = str(trained)
    lpa = render(pipeline, model=model, prompt=PROMPT, lpa=True)
    routed = lpa.metadata["controls"]["lpa"]
    # [CLS]=0 a red arrow pointing left and a blue star , in striped=12 style
    assert routed["style_tokens"] == [12] and lpa.stats["biased_attention_calls"] > 0
    leak = render(pipeline, model=model, prompt=PROMPT, isolate="blue star")
    assert leak.metadata["controls"]["isolated"] == {"blue star": [8, 9]}
    bound = render(pipeline, model=model, prompt="a [red arrow] pointing left and a [blue star], in striped style",
                   binding=True)
    assert [(g["nouns"], g["attributes"]) for g in bound.metadata["controls"]["binding"]] == [([3], [2]), ([9], [8])]
    assert bound.stats["binding_refinement_iterations"] > 0
    compass = render(pipeline, model=model, prompt=PROMPT,
                     compass=json.dumps([{"name": "arrow", "angle": 270, "box": [0, 0, 0.5, 0.5]}]))
    assert compass.metadata["controls"]["compass"][0]["tokens"] == [3, 4]  # <compass-0> right before "arrow"
    assert compass.stats["biased_attention_calls"] > 0


def test_control_effect_runs_end_to_end_on_the_tiny_preset(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("control_effect", Path(__file__).parents[1] / "benchmarks" /
                                                  "control_effect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "effect.json"
    report = module.main(["--preset", "tiny", "--prompts", "1", "--seeds", "1", "--steps", "2", "--bootstrap", "50",
                          "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    methods = [row["method"] for row in report["rows"]]
    assert methods == ["none", "binding", "lpa", "compass", "leakfix"]
    assert "meaningless" in report["settings"]["note"]
    for row in report["rows"][1:]:
        assert set(row["metrics"]) == {"binding", "presence", "leakage", "heading_error", "style_correct"}
        assert row["target_metric"] in row["metrics"]
