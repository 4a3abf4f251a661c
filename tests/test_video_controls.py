"""Image-tab token controls on the video UNet's spatial cross-attention, shot by shot, checked at the hook."""
from __future__ import annotations

import json

import numpy as np
import torch

from pipelines.models import ModelStore
from pipelines.tabs.video import VideoPipeline, VideoRequest
from tests.test_video import record_contexts

SMALL = dict(width=32, height=32, steps=2, guidance_scale=7.5, fps=4, seed=3, num_frames=8, context_length=8)
SHOTS = json.dumps([{"start": 0, "prompt": "a pool by a table"},
                    {"start": 4, "prompt": "a castle in watercolor style", "transition": "cut"}])

VIDEO = VideoPipeline(ModelStore(packaged={}), "tiny")


def contexts(**fields) -> tuple[torch.Tensor, object]:
    return record_contexts(VIDEO, **{**SMALL, "shots": SHOTS, **fields})


def test_leakage_fix_patches_only_the_frames_of_the_shot_that_names_the_item():
    plain, _ = contexts()
    fixed, result = contexts(isolate="pool")
    pipe = VIDEO.load("")
    from pipelines.diffusion.leakfix import encoded_at_place
    from pipelines.diffusion.prompts import find_words

    changed = [frame for frame in range(8) if not torch.allclose(plain[8 + frame], fixed[8 + frame], atol=1e-6)]
    assert changed == [0, 1, 2, 3]
    positions = result.metadata["parameters"]["controls"][0]["isolated"]["pool"]
    with torch.no_grad():
        alone = encoded_at_place(pipe, "a pool by a table", find_words("a pool by a table", "pool"), positions, 1)
    torch.testing.assert_close(fixed[8 + 0, positions], alone[0], rtol=0, atol=1e-5)
    assert torch.equal(plain[:8], fixed[:8])  # negative half untouched


def test_lpa_biases_only_the_styled_shots_frames_in_its_window():
    result = VIDEO.run(VideoRequest(**{**SMALL, "shots": SHOTS, "lpa": True, "steps": 3}))
    report = result.metadata["parameters"]["controls"]
    assert "skipped" in report[0]["lpa"] and report[1]["lpa"]["frames"] == "4-7"
    assert result.stats["biased_attention_calls"] > 0


def test_lpa_bias_rows_cover_one_shots_conditional_frames():
    from pipelines.diffusion.shot_controls import ShotControls

    video_request = VideoRequest(**{**SMALL, "shots": SHOTS, "lpa": True})
    plan = VIDEO.plan(video_request)
    controls = ShotControls(VIDEO.load(""), plan)
    assert controls.attention.biases and all(bias.rows == slice(12, 16) for bias in controls.attention.biases)
    assert all(bias.timesteps == (300.0, 650.0) for bias in controls.attention.biases)
    assert controls.per_frame is None  # LPA alone leaves the text context to FreeNoise


def test_binding_merges_bracketed_groups_and_controls_off_ab_matches_plain_run():
    shots = json.dumps([{"start": 0, "prompt": "a [red hat] and a [blue car]"}])
    result = VIDEO.run(VideoRequest(**{**SMALL, "shots": shots, "binding": True, "compare": "controls off"}))
    groups = result.metadata["parameters"]["controls"][0]["binding"]
    assert [group["phrase"] for group in groups] == ["red hat", "blue car"]
    plain = VIDEO.run(VideoRequest(**{**SMALL, "prompt": "a red hat and a blue car"}))
    baseline = result.baseline.value
    assert np.array_equal(baseline.frames, plain.value.frames)
    assert not np.array_equal(result.value.frames, plain.value.frames)


def test_binding_refines_only_the_bound_shots_frames():
    """ToMe's step-0 refinement on video: the entropy step moves the latents of the shot with groups and no
    other frame's; the noise itself is the pipeline's own draw for the seed."""
    from pipelines.diffusion.shot_controls import ShotControls

    shots = json.dumps([{"start": 0, "prompt": "a pool by a table"},
                        {"start": 4, "prompt": "a [red hat] and a [blue car]", "transition": "cut"}])
    request = VideoRequest(**{**SMALL, "shots": shots, "binding": True, "steps": 10})
    plan = VIDEO.plan(request)
    pipe = VIDEO.load("")
    controls = ShotControls(pipe, plan)
    assert list(controls.bindings) == [1] and controls.bindings[1].frames == [4, 5, 6, 7]
    arguments = VIDEO.call_arguments(plan, request)
    noise = pipe.prepare_latents(1, pipe.unet.config.in_channels, 8, 32, 32, controls.edited[0].dtype,
                                 pipe._execution_device, torch.Generator("cpu").manual_seed(request.seed))
    before = controls.per_frame.clone()
    with controls:
        latents = controls.start(pipe, arguments)
    history = controls.bindings[1].history
    assert {entry["loss"] for entry in history} == {"binding", "entropy"}
    assert torch.equal(latents[:, :, :4], noise[:, :, :4])
    assert not torch.allclose(latents[:, :, 4:], noise[:, :, 4:])
    # the refined composite tokens reach the bound shot's frames of the per-frame context, and only those
    assert torch.equal(controls.per_frame[:4], before[:4]) and not torch.equal(controls.per_frame[4:], before[4:])


def test_binding_refinement_runs_in_the_video_pipeline():
    shots = json.dumps([{"start": 0, "prompt": "a [red hat] and a [blue car]"}])
    result = VIDEO.run(VideoRequest(**{**SMALL, "shots": shots, "binding": True, "steps": 10}))
    assert result.stats["binding_refinement_iterations"] > 0
    shot = result.stats["binding_shots"]["shot 1"]  # the token step is scaled to the video's latent: no blow-up
    for norms in shot["binding_token_norm"].values():
        assert len(norms) >= 2 and max(norms) < 1.5 * norms[0] and min(norms) > 0.5 * norms[0]
