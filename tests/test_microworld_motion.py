"""Micro-world motion: clips move as their captions say and stay in frame; the adapter copies the UNet's layout,
starts as the image model frame by frame, and its motion modules (only they) learn; the trainer saves, resumes and
packs a loadable MotionAdapter folder; the video tab lists the model only while its folder exists."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

MOTION = ["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--frames", "4", "--max-seq-length", "8",
          "--max-steps", "2", "--log-every", "1", "--warmup", "1", "--no-samples", "--probe-clips", "2"]
pytestmark = pytest.mark.usefixtures("one_thread")


def centroids(coverage: torch.Tensor) -> torch.Tensor:
    """[..., H, W] coverage -> [..., 2] (x, y) centroid in pixel-centre coordinates."""
    coords = torch.arange(coverage.shape[-1], dtype=torch.float32) + 0.5
    mass = coverage.sum((-2, -1)).clamp_min(1e-9)
    return torch.stack([(coverage.sum(-2) * coords).sum(-1) / mass, (coverage.sum(-1) * coords).sum(-1) / mass], -1)


def test_objects_move_by_their_velocity_inside_the_frame_as_the_caption_says():
    from pipelines.microworld import motion_v2
    from pipelines.microworld.scenes import direction_word

    clips = motion_v2.sample_clips(12, 3, frames=8, size=64)
    videos, coverage = motion_v2.render_clips(clips)
    assert videos.shape == (12, 8, 3, 64, 64)
    edge = torch.cat([coverage[..., 0, :], coverage[..., -1, :], coverage[..., :, 0], coverage[..., :, -1]], -1)
    assert float(edge.max()) == 0.0  # every object wholly inside every frame
    track = centroids(coverage)  # [clips, frames, objects, 2]
    moved = 0
    rng = np.random.default_rng(0)
    for i in range(len(clips)):
        caption, words = motion_v2.clip_caption(clips, i, rng), clips.motion_words(i)
        for k in range(int(clips.start.count[i])):
            if clips.spin[i, k]:
                assert words[k] == "spinning" and "spinning" in caption
                continue
            step = torch.as_tensor(clips.velocity[i, k], dtype=torch.float32)
            expected = track[i, 0, k] + torch.arange(8)[:, None] * step
            assert torch.allclose(track[i, :, k], expected, atol=0.15), (i, k)
            shift = track[i, -1, k] - track[i, 0, k]
            if step.norm() == 0:
                assert words[k] == "" and shift.norm() < 0.05
                continue
            measured = direction_word(float(np.degrees(np.arctan2(-shift[1], shift[0]))))
            assert words[k] == f"moving {measured}" and words[k] in caption
            if clips.start.shape[i, k] == 4:  # arrows move the way they point
                assert f"pointing {measured} moving {measured}" in caption
            moved += 1
    assert moved >= 10 and 2.0 < float(np.linalg.norm(clips.velocity, axis=-1).max()) * 7 < 25


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny micro-world v2 folder (random weights, v2 layout), saved as train_v2 saves it."""
    from pipelines.microworld.train_v2 import save
    from tests.test_compass_v2 import tiny_models

    models, config = tiny_models()
    folder = tmp_path_factory.mktemp("mw") / "base"
    save(models, config, folder, [])
    return folder


def test_adapter_copies_the_unet_layout_starts_as_the_image_model_and_learns(base):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipelines.microworld import train_motion as tm
    from pipelines.microworld.train_v2 import SD15_SCHEDULE
    from pipelines.microworld.train_v2 import descend, optimiser

    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    model = tm.motion_unet(unet, tm.build_adapter(unet.config, 8))
    temporal = model.down_blocks[0].motion_modules[0]
    assert temporal.norm.num_groups == unet.config.norm_num_groups == 4
    assert temporal.transformer_blocks[0].attn1.heads == unet.config.attention_head_dim[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".motion_modules." in n for n in trainable)
    config = tm.parse_args(MOTION)
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([500, 900])
    video = model(latents, t, encoder_hidden_states=context.repeat_interleave(4, 0)).sample
    frames = unet(latents.transpose(1, 2).flatten(0, 1), t.repeat_interleave(4), context.repeat_interleave(4, 0)).sample
    assert torch.allclose(video.transpose(1, 2).flatten(0, 1), frames, atol=1e-5)  # zeroed outputs: frame by frame
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimiser(params, 1e-3, 1)
    losses = []
    for _ in range(4):
        torch.manual_seed(1)  # the same noise and timesteps: a fixed batch
        loss = tm.motion_loss(model, latents, context, alphas, config, torch.device("cpu"))
        losses.append(loss.item())
        descend(optimizer, schedule, loss, params)
    assert losses[-1] < losses[0] - 1e-4, losses
    assert torch.equal(model.conv_in.weight, unet.conv_in.weight)  # the image UNet stays frozen


def test_reversed_captions_name_the_opposite_direction_and_keep_the_rest():
    from pipelines.microworld import motion_v2

    clips = motion_v2.sample_clips(16, 4, frames=8, size=64)
    opposite = {"left": "right", "up": "down", "up-left": "down-right", "up-right": "down-left"}
    opposite |= {v: k for k, v in opposite.items()}
    changed = 0
    for i in range(len(clips)):
        words, reversed_words = clips.motion_words(i), clips.motion_words(i, reverse=True)
        for word, other in zip(words, reversed_words):
            if word.startswith("moving "):
                assert other == "moving " + opposite[word.removeprefix("moving ")]
                changed += 1
            else:
                assert other == word  # still or spinning: nothing to reverse
        true, flipped = (motion_v2.clip_caption(clips, i, np.random.default_rng(i), r) for r in (False, True))
        assert true.split("moving")[0] == flipped.split("moving")[0]  # same template and object phrases
    assert changed >= 10


def test_v_weighting_equals_the_v_prediction_error_of_the_same_epsilon_prediction():
    from diffusers import DDPMScheduler

    from pipelines.microworld import train_motion as tm
    from pipelines.microworld.train_v2 import SD15_SCHEDULE

    scheduler = DDPMScheduler(**SD15_SCHEDULE, prediction_type="v_prediction")
    alphas = scheduler.alphas_cumprod
    torch.manual_seed(0)
    x0, noise, eps_hat = torch.randn(3, 3, 4, 2, 2, 2).unbind(0)
    t = torch.tensor([10, 500, 990])
    a = alphas[t].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v_error = (scheduler.get_velocity(x0, noise, t) - (a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat)) ** 2
    eps_error = ((noise - eps_hat) ** 2).mean((1, 2, 3, 4))
    weighted = eps_error * tm.loss_weights(alphas, t, "v")
    assert torch.allclose(weighted, v_error.mean((1, 2, 3, 4)), rtol=1e-4)
    assert torch.equal(tm.loss_weights(alphas, t, "eps"), torch.ones(3))
    assert 150 < float(tm.loss_weights(alphas, torch.tensor([999]), "v")) < 250
    with pytest.raises(ValueError):
        tm.loss_weights(alphas, t, "snr")


def test_probe_reads_the_image_model_as_parity_and_no_direction_gain_and_an_adapter_off_parity(base):
    from diffusers import DDPMScheduler

    from pipelines.microworld import train_motion as tm
    from pipelines.microworld.train_v2 import SD15_SCHEDULE, load_resumed

    config = tm.parse_args(MOTION + ["--base", str(base), "--probe-clips", "5"])
    device = torch.device("cpu")
    models = load_resumed(base, device)
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod
    probe = tm.make_probe(models, config, device, alphas)
    assert probe.t.tolist() == list(tm.PROBE_T) and not torch.equal(probe.context, probe.reversed_context)
    fresh = tm.motion_unet(models.unet, tm.build_adapter(models.unet.config, 8)).eval()
    report = tm.probe_report(fresh, probe, config, device)
    assert all(abs(report[f"mse/image_t{t}"] - 1) < 1e-4 for t in tm.PROBE_T)  # zeroed adapter = image model
    assert abs(report["direction"]) < 1e-4
    for module in fresh.modules():  # an adapter that adds something: the ratios move off parity
        if module.__class__.__name__ == "AnimateDiffTransformer3D":
            torch.nn.init.normal_(module.proj_out.weight, std=0.5)
    moved = tm.probe_report(fresh, probe, config, device)
    assert any(abs(moved[f"mse/image_t{t}"] - 1) > 1e-3 for t in tm.PROBE_T) and moved["direction"] != 0


def test_trainer_saves_resumes_and_packs_a_loadable_adapter(base, tmp_path):
    from diffusers import MotionAdapter
    from safetensors.torch import load_file

    from pipelines.microworld import train_motion as tm

    out = tm.train(tm.parse_args(MOTION + ["--base", str(base), "--out", str(tmp_path / "a")]))
    report = json.loads((out / "train_report.json").read_text())
    history = report["runs"][0]["history"]
    assert report["steps"] == 2 and [r["step"] for r in history if "loss" in r] == [1, 2]
    assert all("direction" in r and "mse/image_t100" in r for r in history if "loss" in r)  # the probe is logged
    adapter = MotionAdapter.from_pretrained(out)
    assert adapter.config.block_out_channels == [16, 16, 16, 16] and adapter.config.motion_max_seq_length == 8
    assert adapter.config.motion_norm_num_groups == 4 and list(adapter.config.motion_num_attention_heads) == [2] * 4
    saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert all(torch.equal(saved[k].float(), v) for k, v in adapter.state_dict().items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("proj_out.weight"))  # it trained
    again = tm.train(tm.parse_args(MOTION + ["--base", str(base), "--resume", str(out), "--out", str(tmp_path / "b"),
                                            "--pack", str(tmp_path / "pack"), "--samples", "--sample-steps", "1",
                                            "--sample-videos", "2", "--weighting", "v"]))
    report = json.loads((again / "train_report.json").read_text())
    assert report["steps"] == 4 and len(report["runs"]) == 2 and report["runs"][1]["config"]["weighting"] == "v"
    parts = sorted((tmp_path / "pack").glob("b.tar.part*"))
    assert parts and all((tmp_path / "pack" / name).is_file() for name in ("train_report.json", "samples.png"))
    samples = json.loads((again / "samples.json").read_text())
    assert all(len(reads) == 2 for reads in samples["reads"].values()) and "moved_as_stated" in samples["summary"]


def test_video_tab_lists_the_motion_model_only_while_its_folder_exists_and_serves_it(base, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from pipelines import microworld
    from pipelines.base import Result
    from pipelines.microworld import train_motion as tm
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_VIDEO_MODEL, models_for
    from pipelines.tabs.video import VideoPipeline, VideoRequest

    monkeypatch.setattr(microworld, "WEIGHTS_MOTION_V2", tmp_path / "weights_motion_v2")
    monkeypatch.setattr(microworld, "WEIGHTS_V2", base)
    names = lambda: [spec.name for spec in models_for("video", "auto")]  # noqa: E731
    assert MICROWORLD_VIDEO_MODEL not in names()
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    tm.build_adapter(unet.config, 8).save_pretrained(tmp_path / "weights_motion_v2")
    assert names()[-1] == MICROWORLD_VIDEO_MODEL and MICROWORLD_VIDEO_MODEL not in [
        spec.name for spec in models_for("video", "tiny")]
    spec = models_for("video", "auto")[-1]
    store = ModelStore(device=torch.device("cpu"), dtype=torch.float32)
    assert store.availability(spec).here
    assert store.resolve(spec).location == str(tmp_path / "weights_motion_v2")
    video = VideoPipeline(store, "auto")
    request = VideoRequest(prompt="a red circle moving left", model=MICROWORLD_VIDEO_MODEL, num_frames=2, steps=1,
                           width=32, height=32, fast=False)
    result = list(video.generate(request))[-1]
    assert isinstance(result, Result) and result.stats["model"] == MICROWORLD_VIDEO_MODEL
    assert video.load(MICROWORLD_VIDEO_MODEL).scheduler.config.beta_schedule == "scaled_linear"  # as trained
    native = video.plan(VideoRequest(prompt="a red circle moving left", model=MICROWORLD_VIDEO_MODEL, width=0,
                                      height=0))
    assert (native.width, native.height) == (128, 128)  # 0 asks for the side micro-world was trained at


def test_sample_read_measures_the_shift_along_the_stated_direction_and_the_frame_to_frame_step():
    from pipelines.microworld.motion_v2 import stated_motion
    from pipelines.microworld.scenes import BACKGROUND, PALETTE

    frames = np.tile(np.array(BACKGROUND, np.uint8), (3, 32, 32, 1))
    for f, x in enumerate((20, 17, 14)):  # a red patch drifting 3 px a frame to the left
        frames[f, 10:16, x:x + 6] = PALETTE["red"]
    assert stated_motion("a red circle moving left", frames) == {"shift": 6.0, "step": 3.0}
    assert stated_motion("a red circle moving right", frames)["shift"] == -6.0
    assert stated_motion("a green arrow pointing up-left moving up-left", frames) is None  # no green here
    assert stated_motion("a blue square spinning", frames) is None


def test_committed_motion_adapter_is_the_offline_video_model_and_serves_frames(hub_offline_empty_cache, tmp_path,
                                                                                 monkeypatch):
    """The trained adapter in the checkout (not a stand-in): listed, the default offline, resolved from the package,
    loaded with its trained temporal weights, and a request at the tab's defaults (0 = native side) gives 128 px
    frames of the asked count."""
    import imageio
    from safetensors.torch import load_file

    from pipelines import microworld
    from pipelines.base import Result
    from pipelines.models import ModelStore
    from pipelines.presets import MICROWORLD_VIDEO_MODEL
    from pipelines.tabs.video import VideoPipeline, VideoRequest

    folder = microworld.packaged_motion_folder()
    assert folder is not None, "pipelines/microworld/weights_motion_v2 is missing from this checkout"
    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path))
    store = ModelStore(device=torch.device("cpu"), dtype=torch.float32)
    video = VideoPipeline(store, "auto")
    assert video.default_model_name() == MICROWORLD_VIDEO_MODEL  # offline, AnimateDiff needs a download
    resolved = store.resolve(video.spec_for(MICROWORLD_VIDEO_MODEL))
    assert resolved.source == "package" and Path(resolved.location) == microworld.WEIGHTS_MOTION_V2
    result = next(e for e in video.generate(VideoRequest(prompt="a red circle moving right", num_frames=4, steps=1,
                                                         guidance_scale=5.0, seed=0)) if isinstance(e, Result))
    frames = result.value.frames
    assert frames.shape == (4, 128, 128, 3) and result.stats["model"] == MICROWORLD_VIDEO_MODEL
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
    with imageio.get_reader(result.value.video, format="FFMPEG") as reader:
        assert [frame.shape for frame in reader] == [(128, 128, 3)] * 4
    saved = {k: v for f in microworld.WEIGHTS_MOTION_V2.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    name = "down_blocks.0.motion_modules.0.proj_out.weight"
    served = video.load(MICROWORLD_VIDEO_MODEL).unet.state_dict()[name]
    assert saved[name].abs().sum() > 0 and torch.equal(served, saved[name].float())  # trained, and what is served


def resumed_model(base: Path, adapter_folder: Path, rank: int) -> tuple[object, object]:
    """(config, inflated UNet) as ``train`` builds them resuming ``adapter_folder`` with ``--spatial-lora rank``."""
    from pipelines.microworld import train_motion as tm

    config = tm.parse_args(MOTION + ["--base", str(base), "--resume", str(adapter_folder), "--spatial-lora", str(rank)])
    models, adapter, *_ = tm.load_models(config, torch.device("cpu"))
    model = tm.motion_unet(models.unet, adapter)
    tm.spatial_lora(model, config)
    return config, model


@pytest.fixture(scope="module")
def adapter_folder(base, tmp_path_factory) -> Path:
    """An adapter whose temporal outputs are not zero (its motion modules act), saved without a LoRA."""
    from diffusers import UNet2DConditionModel

    from pipelines.microworld import train_motion as tm

    adapter = tm.build_adapter(UNet2DConditionModel.from_pretrained(base / "unet").config, 8)
    torch.manual_seed(3)
    for name, param in adapter.named_parameters():
        if "proj_out" in name:
            torch.nn.init.normal_(param, std=0.2)
    folder = tmp_path_factory.mktemp("adapter") / "weights_motion_v2"
    adapter.save_pretrained(folder)
    return folder


def test_spatial_lora_off_trains_the_same_parameters_to_the_same_values_as_before(base, adapter_folder):
    from dataclasses import replace

    from diffusers import UNetMotionModel

    from pipelines.microworld import train_motion as tm
    from pipelines.microworld.train_v2 import Budget

    config, model = resumed_model(base, adapter_folder, 0)
    models, adapter, *_ = tm.load_models(config, torch.device("cpu"))
    before = UNetMotionModel.from_unet2d(models.unet, adapter)  # the model as the trainer built it before the option
    before.freeze_unet2d_params()
    assert not getattr(model, "peft_config", None)
    assert ([n for n, p in model.named_parameters() if p.requires_grad]
            == [n for n, p in before.named_parameters() if p.requires_grad])
    one_step = replace(config, max_steps=1, probe_clips=0, history=[])
    for trained in (model, before):
        tm.train_steps(trained.train(), models, one_step, torch.device("cpu"), Budget(0), 0)
    after, expected = model.state_dict(), before.state_dict()
    assert after.keys() == expected.keys() and all(torch.equal(after[k], expected[k]) for k in expected)
    name = "down_blocks.0.motion_modules.0.proj_out.weight"
    assert not torch.equal(expected[name], adapter.state_dict()[name])  # a step was taken


def test_spatial_lora_starts_as_the_resumed_adapter_and_trains_with_the_motion_modules(base, adapter_folder):
    from diffusers import DDPMScheduler

    from pipelines.microworld import train_motion as tm
    from pipelines.microworld.train_v2 import SD15_SCHEDULE, descend, optimiser

    _, plain = resumed_model(base, adapter_folder, 0)
    config, model = resumed_model(base, adapter_folder, 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    motion = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert [n for n in trainable if ".lora_" not in n] == motion  # the motion modules still train
    modules = {n.split(".lora_")[0] for n in lora}  # every spatial cross-attention's key and value, nothing else
    spatial = [n for n, _ in plain.named_modules() if n.endswith(".attn2") and "motion_modules" not in n]
    assert spatial and modules == {f"{n}.{p}" for n in spatial for p in ("to_k", "to_v")}
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 77, 32)
    t, states = torch.tensor([500, 900]), context.repeat_interleave(4, 0)
    with torch.no_grad():
        assert torch.equal(model(latents, t, states).sample, plain(latents, t, states).sample)  # B = 0
    alphas = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimiser(params, 1e-3, 1)
    named = dict(model.named_parameters())
    for side in ("lora_B", "lora_A"):  # B = 0 leaves A without a gradient until B has moved
        torch.manual_seed(1)
        descend(optimizer, schedule, tm.motion_loss(model, latents, context, alphas, config, torch.device("cpu")),
                params)
        assert all(named[n].grad.abs().sum() > 0 for n in lora if side in n)
    assert all(named[n].grad.abs().sum() > 0 for n in motion)


def test_trainer_saves_packs_and_resumes_the_spatial_lora_in_diffusers_format(base, adapter_folder, tmp_path):
    import subprocess

    from diffusers import AnimateDiffPipeline, MotionAdapter
    from safetensors.torch import load_file

    from pipelines.diffusion.animatediff import SPATIAL_LORA
    from pipelines.microworld import train_motion as tm

    common = MOTION + ["--base", str(base), "--probe-clips", "0", "--out", str(tmp_path / "a")]
    out = tm.train(tm.parse_args(common + ["--resume", str(adapter_folder), "--spatial-lora", "4",
                                           "--pack", str(tmp_path / "pack")]))
    saved = load_file(str(out / SPATIAL_LORA))
    assert saved and all(k.startswith("unet.") and ".lora_" in k and v.dtype == torch.float16 for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)  # it trained
    report = json.loads((out / "train_report.json").read_text())
    assert report["spatial_lora_parameters"] == sum(v.numel() for v in saved.values())
    assert report["runs"][-1]["history"][0]["spatial_lora"] == 4
    (tmp_path / "unpacked").mkdir()
    subprocess.run(f"cat {tmp_path}/pack/a.tar.part* | tar -x -C {tmp_path}/unpacked", shell=True, check=True)
    unpacked = tmp_path / "unpacked" / "a"
    _, model = resumed_model(base, unpacked, 0)  # the file's rank, though the flag says 0
    resumed = tm.spatial_lora_state(model)
    assert resumed.keys() == {k.removeprefix("unet.") for k in saved}
    assert all(torch.equal(resumed[k.removeprefix("unet.")], v.float()) for k, v in saved.items())
    pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=MotionAdapter.from_pretrained(unpacked))
    pipe.load_lora_weights(unpacked, weight_name=SPATIAL_LORA)  # the standard loader takes it
    assert sum(".lora_" in n for n, _ in pipe.unet.named_parameters()) == len(saved)
    with pytest.raises(SystemExit, match="rank-4"):
        resumed_model(base, out, 8)
    tm.train(tm.parse_args(common))  # a run without one leaves no stale LoRA to be served with its adapter
    assert not (out / SPATIAL_LORA).exists()


def test_video_tab_fuses_the_folders_spatial_lora_into_its_own_unet_only(base, adapter_folder, tmp_path,
                                                                         monkeypatch):
    import shutil

    from diffusers import AnimateDiffPipeline

    from pipelines import microworld
    from pipelines.diffusion.animatediff import SPATIAL_LORA
    from pipelines.diffusion.fast import supported
    from pipelines.microworld import train_motion as tm
    from pipelines.models import ModelStore, placement
    from pipelines.presets import MICROWORLD_MODEL, MICROWORLD_VIDEO_MODEL
    from pipelines.tabs.image import ImagePipeline
    from pipelines.tabs.video import VideoPipeline, VideoRequest

    folder = tmp_path / "weights_motion_v2"
    shutil.copytree(adapter_folder, folder)
    monkeypatch.setattr(microworld, "WEIGHTS_MOTION_V2", folder)
    monkeypatch.setattr(microworld, "WEIGHTS_V2", base)
    monkeypatch.setenv("TOKENWORKS_OUTPUT_DIR", str(tmp_path / "outputs"))
    store = ModelStore(device=torch.device("cpu"), dtype=torch.float32)
    image_unet = ImagePipeline(store, "auto").load(MICROWORLD_MODEL).pipe.unet  # the image tab's, in the same store
    stored, where = {k: v.clone() for k, v in image_unet.state_dict().items()}, placement(image_unet)
    video = VideoPipeline(store, "auto")
    request = dict(prompt="a red circle moving left", model=MICROWORLD_VIDEO_MODEL, num_frames=4, steps=2,
                   guidance_scale=5.0, seed=0)
    plain = video.run(VideoRequest(**request)).value.frames
    _, model = resumed_model(base, folder, 4)
    torch.manual_seed(5)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(param, std=0.5)
    lora = tm.spatial_lora_state(model)
    AnimateDiffPipeline.save_lora_weights(folder, unet_lora_layers=lora, weight_name=SPATIAL_LORA)
    store.unload(MICROWORLD_VIDEO_MODEL)
    pipe = video.load(MICROWORLD_VIDEO_MODEL)
    assert supported(pipe.unet) and not any(".lora_" in n for n, _ in pipe.unet.named_parameters())  # fused
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    fused = pipe.unet.get_submodule(name).weight
    update = lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]  # scale 1: alpha = rank
    assert torch.allclose(fused, stored[f"{name}.weight"] + update, atol=1e-6) and update.abs().sum() > 0
    torch.manual_seed(0)
    latents, t, states = torch.randn(1, 4, 4, 8, 8), torch.tensor([700]), torch.randn(4, 77, 32)
    with torch.no_grad():  # served as trained: the fused UNet computes what the trainer's LoRA model did
        assert torch.allclose(pipe.unet(latents, t, states).sample, model.eval()(latents, t, states).sample,
                              atol=1e-5)
    result = video.run(VideoRequest(**request))
    assert result.stats["fast"] == "eager"  # the fast path takes the fused UNet (on the CPU: its eager backend)
    assert np.abs(result.value.frames - plain).max() > 1e-3
    assert placement(image_unet) == where
    assert all(torch.equal(v, stored[k]) for k, v in image_unet.state_dict().items())  # the image tab's UNet
    half = VideoPipeline(ModelStore(device=torch.device("cpu"), dtype=torch.bfloat16), "auto").load(
        MICROWORLD_VIDEO_MODEL)  # fused in fp32, then cast as the store asks
    assert {p.dtype for p in [*half.unet.parameters(), *half.text_encoder.parameters()]} == {torch.bfloat16}
    assert torch.equal(half.unet.get_submodule(name).weight, fused.bfloat16())
