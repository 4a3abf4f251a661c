"""Micro-world v2 trainer: every stage runs a step at tiny sizes, saves a loadable SD folder, resumes from the
weights alone, packs into parts the device can return; the saved model runs in the served image pipeline and
through the sanity-gates script."""
from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY = ["--device", "cpu", "--dtype", "fp32", "--size", "32", "--text-width", "32", "--text-layers", "2",
        "--vision-layers", "1", "--vae-channels", "8,16,16", "--unet-channels", "16,16,16,16",
        "--layers-per-block", "1", "--head-dim", "8", "--norm-groups", "4", "--clip-batch", "8", "--vae-batch", "4",
        "--unet-batch", "4", "--compass-batch", "2", "--max-steps", "2", "--log-every", "1", "--no-samples"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from pipelines.microworld.train_v2 import parse_args, train

    out = tmp_path_factory.mktemp("microworld_v2") / "run"
    return train(parse_args(TINY + ["--stages", "clip,vae,unet", "--out", str(out)]))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_stages_save_a_loadable_sd_folder_with_a_clip_text_encoder(trained):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    report = json.loads((trained / "train_report.json").read_text())
    assert report["steps"] == {"clip": 2, "vae": 2, "unet": 2, "compass": 0}
    stages = [row["stage"] for row in report["runs"][0]["history"] if "step" in row]
    assert stages == ["clip", "clip", "vae", "vae", "unet", "unet"]
    assert all(np.isfinite(row.get("loss", row.get("mse", 0))) for row in report["runs"][0]["history"])
    assert all(f.stat().st_size <= 15 * 2**20 for f in trained.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(trained, torch_dtype=torch.float32)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.scaling_factor != 0.18215
    assert pipe.tokenizer.pad_token == "<|endoftext|>"


def test_resume_continues_the_unet_from_weights_and_trains_a_compass_encoder(trained, tmp_path):
    from pipelines.diffusion.compass_train import load_trained_compass
    from pipelines.microworld.train_v2 import parse_args, train

    resumed = train(parse_args(TINY + ["--stages", "unet,compass", "--resume", str(trained),
                                       "--out", str(tmp_path / "resumed")]))
    report = json.loads((resumed / "train_report.json").read_text())
    assert report["steps"] == {"clip": 2, "vae": 2, "unet": 4, "compass": 2} and len(report["runs"]) == 2
    unet_steps = [row["step"] for row in report["runs"][1]["history"] if row.get("stage") == "unet" and "step" in row]
    assert unet_steps == [3, 4]
    for part in ("vae", "text_encoder"):
        before, after = weights(trained / part), weights(resumed / part)
        assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = weights(trained / "unet"), weights(resumed / "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    encoder = load_trained_compass(resumed / "compass")
    assert encoder(torch.tensor([0.0, 90.0])).shape == (2, 32)
    with pytest.raises(SystemExit, match="frozen"):
        train(parse_args(TINY + ["--stages", "clip", "--resume", str(trained), "--out", str(tmp_path / "no")]))


def test_a_new_text_encoder_replaces_the_old_one_and_the_unet_goes_on(trained, tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    from pipelines.microworld import text_v2
    from pipelines.microworld.train_v2 import parse_args, train

    words = text_v2.vocabulary()
    monkeypatch.setattr(text_v2, "vocabulary", lambda: [*words, "zigzagging"])  # a word the old folder lacks
    resumed = train(parse_args(TINY + ["--stages", "clip,unet", "--resume", str(trained), "--new-text-encoder",
                                       "--clip-lr", "0.01", "--warmup", "1", "--out", str(tmp_path / "retext")]))
    report = json.loads((resumed / "train_report.json").read_text())
    assert report["steps"]["unet"] == 4
    clip_rows = [row for row in report["runs"][1]["history"] if row.get("stage") == "clip" and "step" in row]
    assert [row["step"] for row in clip_rows] == [1, 2] and all("heading" in row for row in clip_rows)
    before, after = weights(trained / "text_encoder"), weights(resumed / "text_encoder")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert CLIPTokenizer.from_pretrained(resumed / "tokenizer").tokenize("zigzagging") == ["zigzagging</w>"]


def test_unet_stage_trains_on_the_word_readout_and_saves_a_folder_that_loads_it(trained, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from pipelines.microworld import train_v2
    from pipelines.microworld.word_readout import WordReadoutCLIPTextModel

    contexts = []
    conditioning = train_v2.conditioning

    def spy(models, ids, *args):
        latents, context = conditioning(models, ids, *args)
        contexts.append((ids, context))
        return latents, context

    monkeypatch.setattr(train_v2, "conditioning", spy)
    v3 = train_v2.train(train_v2.parse_args(TINY + ["--stages", "unet,compass", "--resume", str(trained),
                                                    "--text-readout", "words", "--out", str(tmp_path / "v3")]))
    eot = json.loads((trained / "text_encoder" / "config.json").read_text())["eos_token_id"]
    for ids, context in contexts:
        first = (ids == eot).int().argmax(-1)
        for row in range(len(ids)):
            assert (context[row, first[row]:] == 0).all() and (context[row, :first[row]].abs().sum(-1) > 0).all()
    report = json.loads((v3 / "train_report.json").read_text())
    assert report["steps"]["unet"] == 4 and report["steps"]["compass"] == 2
    assert report["runs"][-1]["config"]["text_readout"] == "words"
    for part in ("vae", "text_encoder"):
        before, after = weights(trained / part), weights(v3 / part)
        assert all(torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(v3)
    assert type(pipe.text_encoder) is WordReadoutCLIPTextModel
    again = train_v2.train(train_v2.parse_args(TINY + ["--stages", "unet", "--resume", str(v3), "--max-steps", "1",
                                                       "--out", str(tmp_path / "again")]))
    assert json.loads((again / "train_report.json").read_text())["runs"][-1]["config"]["text_readout"] == "words"
    with pytest.raises(SystemExit, match="text-readout"):
        train_v2.train(train_v2.parse_args(TINY + ["--stages", "unet", "--resume", str(trained), "--text-readout",
                                                   "eot", "--out", str(tmp_path / "no")]))


def test_pack_splits_the_folder_into_parts_that_unpack_to_the_same_files(trained, tmp_path):
    from pipelines.microworld import train_v2

    parts = train_v2.pack(trained, tmp_path / "out", part_bytes=50_000)
    assert len(parts) > 1 and all(p.stat().st_size <= 50_000 for p in parts)
    assert (tmp_path / "out" / "train_report.json").is_file()
    (tmp_path / "back").mkdir()
    subprocess.run(f"cat {tmp_path / 'out'}/{trained.name}.tar.part* | tar -x -C {tmp_path / 'back'}", shell=True,
                   check=True)
    for original in trained.rglob("*"):
        if original.is_file():
            copy = tmp_path / "back" / trained.name / original.relative_to(trained)
            assert copy.read_bytes() == original.read_bytes()


def test_v2_model_runs_in_the_served_image_pipeline(trained, tmp_path, monkeypatch):
    from pipelines.base import Result
    from pipelines.models import ModelStore
    from pipelines.tabs.image import ImagePipeline, ImageRequest

    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    pipeline = ImagePipeline(ModelStore(device=torch.device("cpu")), "auto")
    request = ImageRequest(prompt="a striped red circle and a green arrow pointing left", model=str(trained),
                           steps=2, seed=3, width=32, height=32, preview_every=0, fast=False)
    result = next(e for e in pipeline.generate(request) if isinstance(e, Result))
    image = Image.open(result.value[0])
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def load_benchmark(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_oracle_confines_each_objects_words_to_its_box_on_the_served_path(trained, tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    from pipelines.base import Result
    from pipelines.models import ModelStore

    gates = load_benchmark("microworld_v2_gates")
    tokenizer = CLIPTokenizer.from_pretrained(trained / "tokenizer")
    pairs = (("yellow", "circle"), ("red", "triangle"))
    text = "a yellow circle and a red triangle"
    assert [b.tokens for b in gates.oracle_biases(tokenizer, text, pairs, "phrase")] == [[2, 3], [6, 7]]
    assert [b.tokens for b in gates.oracle_biases(tokenizer, text, pairs, "colour")] == [[2], [6]]
    eot = gates.oracle_biases(tokenizer, text, pairs, "phrase+eot")[-1]
    assert eot.tokens == list(range(8, 77)) and eot.region is None  # every end token, every query
    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    pipeline = gates.OraclePipeline(ModelStore(device=torch.device("cpu")), "auto")
    request = gates.OracleRequest(prompt=text, model=str(trained), steps=2, seed=1, width=32, height=32,
                                  preview_every=0, compare="controls off", oracle="phrase", oracle_pairs=pairs)
    result = next(e for e in pipeline.generate(request) if isinstance(e, Result))
    assert result.metadata["controls"]["oracle"] == "phrase" and result.stats["biased_attention_calls"] > 0
    on, off = (np.asarray(Image.open(p[0]), np.float32) for p in (result.value, result.baseline.value))
    assert np.abs(on - off).max() > 0  # the masks changed the picture; the baseline is the plain served run


def test_gates_script_runs_on_the_trained_folder(trained, tmp_path):
    gates = load_benchmark("microworld_v2_gates")
    report = gates.main(["--model", str(trained), "--device", "cpu", "--gate-seeds", "1", "--steps", "1",
                         "--noise", "4", "--gate-stride", "20", "--bootstrap", "20", "--json", str(tmp_path / "g.json"),
                         "--sheet", str(tmp_path / "g.png")])
    assert set(report["gates"]) == {"single_object_colour_accuracy", "heading_error_deg", "noise_presence",
                                    "oracle_binding_gain"}
    assert report["gates"]["noise_presence"]["value"] <= 0.1
    assert set(report["gates"]["noise_presence"]["kinds"]) == set(gates.NOISE_KINDS)
    assert report["gates"]["oracle_binding_gain"]["units"] == 1
    assert report["gates"]["single_object_colour_accuracy"]["images"] == 2  # 40 prompts, every 20th, one seed
    assert json.loads((tmp_path / "g.json").read_text())["passed"] == report["passed"]
    assert Image.open(tmp_path / "g.png").size[0] == 128


def test_control_effect_v2_runs_end_to_end_on_the_served_path(trained, tmp_path):
    effect = load_benchmark("control_effect_v2")
    out = tmp_path / "effect.json"
    report = effect.main(["--model", str(trained), "--device", "cpu", "--units", "3", "--batch", "2", "--steps", "1",
                          "--gate-seeds", "1", "--gate-stride", "20", "--noise", "4", "--bootstrap", "20",
                          "--workers", "0", "--images", str(tmp_path / "images"), "--json", str(out),
                          "--sheet", str(tmp_path / "sheet.png"), "--sheet-pairs", "2",
                          "--pack", str(tmp_path / "out")])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert set(report["gates"]) == {"single_object_colour_accuracy", "heading_error_deg", "noise_presence",
                                    "oracle_binding_gain"}
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["binding", "lpa", "compass", "leakfix"]
    assert rows["compass"]["measurable"] is False and "compass" in rows["compass"]["reason"]  # no encoder saved
    for name in ("binding", "lpa", "leakfix"):
        row = rows[name]
        assert row["units"] == 3 and row["images"] == 6 and row["target_metric"] in row["metrics"]
        assert set(row["metrics"][row["target_metric"]]) == {"n", "off", "on", "difference", "ci95", "excludes_zero",
                                                             "improves"}
        assert set(row["validity"]) == {"off", "on", "ratio", "kept"}
    lines = [json.loads(line) for line in (tmp_path / "images" / "units.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {(u["control"], u["prompt"], u["seed"]) for u in lines}.__len__() == 9
    assert all(Path(u["off"]["path"]).is_file() and Path(u["on"]["path"]).is_file() for u in lines)
    assert Image.open(tmp_path / "sheet.png").size[0] == 4 * 128  # two off | on pairs per control row
    subprocess.run(f"cat {tmp_path / 'out'}/control_effect_v2_jpeg.tar.part* | tar -x -C {tmp_path}", shell=True,
                   check=True)
    back = tmp_path / "control_effect_v2_jpeg"
    assert (back / "units.jsonl").is_file() and len(list(back.rglob("*.jpg"))) == len(list(
        (tmp_path / "images").rglob("*.png")))


def test_unet_log_reports_a_text_gap_that_is_zero_exactly_when_the_unet_ignores_the_caption(trained):
    from diffusers import DDPMScheduler

    from pipelines.microworld import train_v2

    report = json.loads((trained / "train_report.json").read_text())
    unet_rows = [row for row in report["runs"][0]["history"] if row.get("stage") == "unet" and "step" in row]
    assert unet_rows and all("text_gap" in row for row in unet_rows)
    config = train_v2.parse_args(TINY + ["--probe-scenes", "6"])
    device = torch.device("cpu")
    models = train_v2.load_resumed(trained, device)
    probe = train_v2.make_text_probe(models, config, device, DDPMScheduler(**train_v2.SD15_SCHEDULE).alphas_cumprod)
    assert not torch.equal(probe.context, probe.rolled)  # six different captions
    reads = train_v2.text_gap(models.unet, probe, config, device)
    for name, module in models.unet.named_modules():
        if name.endswith("attn2"):
            torch.nn.init.zeros_(module.to_out[0].weight)
            torch.nn.init.zeros_(module.to_out[0].bias)
    ignores = train_v2.text_gap(models.unet, probe, config, device)
    assert reads["text_gap"] != 0 and ignores["text_gap"] == 0


def test_the_text_probe_is_the_same_in_every_run(trained):
    from diffusers import DDPMScheduler

    from pipelines.microworld import train_v2

    config = train_v2.parse_args(TINY + ["--probe-scenes", "4"])
    models = train_v2.load_resumed(trained, torch.device("cpu"))
    alphas = DDPMScheduler(**train_v2.SD15_SCHEDULE).alphas_cumprod
    first = train_v2.make_text_probe(models, config, torch.device("cpu"), alphas)
    torch.randn(7)  # whatever the global generator did before
    again = train_v2.make_text_probe(models, config, torch.device("cpu"), alphas)
    assert torch.equal(first.noisy, again.noisy)
