"""Where ToMe binding's time goes, counted on the CPU: UNet forwards and backwards per image of the refinement
(issue 19), so a change that adds a pass fails here; and the two cuts that leave every value as it was (the entropy
forward stops after the last layer the loss reads, weights need no gradient)."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from pipelines.diffusion.attention import AttentionControl
from pipelines.diffusion.binding import (BindingConfig, SemanticBinding, binding_layers, entropy_losses,
                                         grid_layers, truncated_after)
from pipelines.tabs.image import ImagePipeline, ImageRequest
from pipelines.diffusion.prompts import encode_positive, parse_prompt
from pipelines.models import ModelStore
from pipelines.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a [red hat] and a [blue car]"


def expected_passes(summary: dict, refinement_steps: int = 3) -> tuple[int, int]:
    """Per denoising step with token refinement, for all groups together (one batch, a row per group): one
    classifier-free-guided anchor call (its conditional half is the loss target), ``refinement_steps`` + 1 forwards
    scoring proposals (with gradients unless it is the last, issue 22's back-off) and a backward for the first and
    for each later one but the last that some group accepted; plus one forward+backward per entropy iteration."""
    forwards = backwards = len(summary["binding_entropy_trace"])
    traces = list(summary["binding_loss_trace"].values())
    for start in range(0, len(traces[0]), refinement_steps + 1):
        values = [trace[start:start + refinement_steps + 1] for trace in traces]
        forwards += 1 + len(values[0])
        best = [group[0] for group in values]
        backwards += 1
        for iteration in range(1, len(values[0]) - 1):
            backwards += any(group[iteration] <= low for group, low in zip(values, best))
            best = [min(low, group[iteration]) for group, low in zip(values, best)]
    return forwards, backwards


def test_binding_unet_passes_per_image_with_the_tab_defaults():
    pipeline = ImagePipeline(ModelStore(packaged={}), "tiny")
    stored = pipeline.load("tiny-sd15 (random weights)").pipe
    unet = stored.unet
    scheduler = type(stored.scheduler).from_config(stored.scheduler.config)
    scheduler.set_timesteps(15)
    denoising = len(scheduler.timesteps)  # PNDM's PLMS repeats its first timestep: 16 UNet calls for 15 steps
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    try:  # 15 steps: token and entropy refinement in steps 0 and 1 (5 of 50 in the official config)
        result = pipeline.run(ImageRequest(prompt=PROMPT, model="tiny-sd15 (random weights)", seed=3, binding=True,
                                           steps=15, fast=False))
    finally:
        handle.remove()
    stats = result.stats
    entropy = len(stats["binding_entropy_trace"])
    assert 2 <= entropy <= 2 * BindingConfig().attention_refinement_steps[0]
    forwards, backwards = stats["binding_unet_forwards"], stats["binding_unet_backwards"]
    assert (forwards, backwards) == expected_passes(stats)
    assert forwards == 2 * 5 + entropy and 2 + entropy <= backwards <= 2 * 3 + entropy  # both groups in each call
    assert len(calls) == denoising + forwards  # the counter sees every call besides the denoising loop's
    assert sum(calls) == 2 * 3 + entropy  # with gradients: each proposal but the last (a rejected one is not
    # differentiated: its row goes back to the accepted token and that token's gradient), each entropy iteration


def prepared(steps: int = 10) -> tuple[SemanticBinding, torch.Tensor, torch.Tensor, AttentionControl]:
    pipe = tiny_sd15_pipeline()
    parsed = parse_prompt(PROMPT)
    control = AttentionControl(pipe.unet)
    binding = SemanticBinding(pipe, "sd15", control, parsed, steps=steps)
    pipe.scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    positive = binding.prepare(encode_positive(pipe, parsed.text, 1), encode_positive(pipe, "", 1), latents, 32, 32)
    return binding, positive, latents, control


def entropy_gradients(binding: SemanticBinding, latents: torch.Tensor, positive: torch.Tensor, truncate: bool):
    latents, positive = latents.clone().requires_grad_(True), positive.clone().requires_grad_(True)
    binding.recorder.enabled = True
    binding.recorder.clear()
    t = binding.pipe.scheduler.timesteps[0]
    with binding.control.scope(recorders=[binding.recorder], cfg=False), torch.enable_grad():
        with truncated_after(binding.last_layer) if truncate else nullcontext():
            binding._unet(binding.pipe.scheduler.scale_model_input(latents, t), t, positive, None)
        loss = entropy_losses(binding.recorder.aggregate(), [g.nouns[0] for g in binding.groups],
                              binding.prompt_length + 1, 0.5).sum()
        return (loss, *torch.autograd.grad(loss, [latents, positive]))


def test_entropy_forward_stops_after_the_last_recorded_layer_with_identical_loss_and_gradients():
    binding, positive, latents, control = prepared()
    assert binding.last_layer is binding.pipe.unet.get_submodule(
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2")  # the 8x8 decoder maps of a 16x16 latent
    ran = []
    handle = binding.pipe.unet.up_blocks[3].register_forward_pre_hook(lambda *_: ran.append(True))
    with control:
        full = entropy_gradients(binding, latents, positive, truncate=False)
        assert ran
        ran.clear()
        cut = entropy_gradients(binding, latents, positive, truncate=True)
    handle.remove()
    assert not ran  # the decoder's later blocks never run
    for a, b in zip(full, cut):
        assert torch.equal(a, b)


def test_refinement_needs_no_weight_gradients_and_restores_the_flags():
    binding, positive, latents, control = prepared()
    unet = binding.pipe.unet
    unet.conv_out.weight.requires_grad_(False)  # a flag the refinement must give back as it found it
    before = {name: p.requires_grad for name, p in unet.named_parameters()}
    seen = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    with control:
        binding.refine(0, binding.pipe.scheduler.timesteps[0], latents, positive)
    handle.remove()
    assert seen and not any(seen)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == before


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_the_anchor_call_gives_both_the_loss_target_and_the_anchor_step(guidance):
    """One call per step for every group's anchor: with guidance its conditional half is the target; without, the
    target and the anchor's noise are the same tensor. Each group's chunk is its own anchor's (layout kept)."""
    binding, positive, latents, control = prepared()
    binding.guidance_scale = guidance
    if guidance <= 1:
        binding.negative = None
    t = binding.pipe.scheduler.timesteps[0]
    binding.anchor_latents[1] = binding.anchor_latents[1] + 0.5  # the groups' anchors part after their first step
    with torch.no_grad(), control:
        noise, target = binding._anchor_noise(t, binding.anchor_latents)
        assert binding.passes["forward"] == 1
        for index, (own_noise, own_target) in enumerate(zip(noise.chunk(2), target.chunk(2))):
            cond = binding._unet(binding.anchor_latents[index], t, binding.anchor_embeds[index], None)
            torch.testing.assert_close(own_target, cond, rtol=0, atol=1e-5)
            if guidance > 1:
                uncond = binding._unet(binding.anchor_latents[index], t, binding.negative, None)
                torch.testing.assert_close(own_noise, uncond + guidance * (cond - uncond), rtol=0, atol=1e-4)
    if guidance <= 1:
        assert noise is target


def test_sdxl_at_1024_px_reads_the_official_three_layers_and_stops_after_the_third():
    pipe = tiny_sdxl_pipeline()
    unet = pipe.unet
    official = {f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2" for i in (1, 2, 3)}
    assert binding_layers(unet, (128, 128)) == official < grid_layers(unet, (128, 128))
    assert binding_layers(unet, (16, 16)) == grid_layers(unet, (16, 16))  # a grid without them: by size
    binding = SemanticBinding(pipe, "sdxl", AttentionControl(unet), parse_prompt(PROMPT), steps=10,
                              latent_hw=(128, 128))
    assert binding.last_layer is unet.get_submodule(
        "up_blocks.0.attentions.1.transformer_blocks.3.attn2") and binding.grid == (32, 32)


def test_refinement_through_the_fast_path_runner_equals_the_plain_refinement():
    """The image tab hands the refinement's UNet work to ``FastUNet.captured`` (on the CPU: the same static code,
    uncaptured): same latents, embedding and loss traces as calling the UNet directly."""
    from pipelines.diffusion.fast import FastUNet

    results = []
    for through_fast_path in (False, True):
        binding, positive, latents, control = prepared()
        with control, FastUNet(binding.pipe.unet, "eager", control) as fast:
            binding.runner = fast if through_fast_path else None
            refined = binding.refine(0, binding.pipe.scheduler.timesteps[0], latents, positive)
        results.append((*refined, [h["value"] for h in binding.history], binding.passes["forward"]))
    (plain_latents, plain_positive, plain_trace, plain_forwards), (latents, positive, trace, forwards) = results
    assert torch.equal(latents, plain_latents) and torch.equal(positive, plain_positive)
    assert trace == plain_trace and forwards == plain_forwards


def bound(prompt: str = PROMPT, arch: str = "sd15", images: int = 1, guided: bool = True
          ) -> tuple[SemanticBinding, torch.Tensor, AttentionControl]:
    """A prepared binding on a tiny model (fp32, CPU), built the same way on every call (fixed seeds)."""
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    parsed = parse_prompt(prompt)
    control = AttentionControl(pipe.unet)
    binding = SemanticBinding(pipe, arch, control, parsed, steps=10)
    pipe.scheduler.set_timesteps(10)
    noise = torch.randn(images, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    negative = encode_positive(pipe, "", images) if guided else None
    positive = binding.prepare(encode_positive(pipe, parsed.text, images), negative,
                               noise * pipe.scheduler.init_noise_sigma, 32, 32)
    return binding, positive, control


THREE_GROUPS = "a [red hat], a [blue car] and a [green cup]"


@pytest.mark.parametrize("prompt, groups", [(PROMPT, 2), (THREE_GROUPS, 3)])
@pytest.mark.parametrize("guided", [True, False])
def test_token_refinement_runs_every_group_in_one_unet_call_per_evaluation(prompt, groups, guided):
    """Per denoising step: one anchor call and ``token_refinement_steps`` + 1 loss calls for all groups together
    (before: that many per group), each call's batch one row per group (the anchor's: twice that, with guidance)."""
    binding, positive, control = bound(prompt, guided=guided)
    assert len(binding.groups) == groups
    unet = binding.pipe.unet
    batches = []
    handle = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        with control:
            for step in range(2):
                positive = binding.refine_tokens(step, binding.pipe.scheduler.timesteps[step], positive)
    finally:
        handle.remove()
    evaluations = binding.config.token_refinement_steps + 1
    anchor = groups * (2 if guided else 1)
    assert batches == 2 * ([anchor] + [groups] * evaluations)
    assert binding.passes["forward"] == 2 * (1 + evaluations)
    assert 2 <= binding.passes["backward"] <= 2 * binding.config.token_refinement_steps
    trace = binding.summary()["binding_loss_trace"]  # still one value per group and evaluation
    assert len(trace) == groups and all(len(values) == 2 * evaluations for values in trace.values())


def alone(binding: SemanticBinding, index: int) -> SemanticBinding:
    """``binding`` left with its ``index``-th group only, the anchor state of that group included."""
    binding.groups = [binding.groups[index]]
    binding.anchor_embeds = [binding.anchor_embeds[index]]
    binding.anchor_latents = [binding.anchor_latents[index]]
    binding.anchor_schedulers = [binding.anchor_schedulers[index]]
    binding.token_norms = [binding.token_norms[index]]
    return binding


@pytest.mark.parametrize("arch, images, guided", [("sd15", 1, True), ("sd15", 2, True), ("sd15", 1, False),
                                                  ("sdxl", 1, True)])
def test_batched_token_refinement_equals_refining_each_group_alone(arch, images, guided):
    """The groups' losses are independent, so one batched descent is the per-group one: same tokens, anchor
    latents (two steps: the anchors' scheduler copies keep their own state) and loss traces, up to rounding."""
    def refined(binding, positive, control):
        with control:
            for step in range(2):
                positive = binding.refine_tokens(step, binding.pipe.scheduler.timesteps[step], positive)
        return positive

    together, start, control = bound(arch=arch, images=images, guided=guided)
    batched = refined(together, start, control)
    trace = together.summary()["binding_loss_trace"]
    for index, group in enumerate(together.groups):
        single, own_start, own_control = bound(arch=arch, images=images, guided=guided)
        assert torch.equal(own_start, start)
        single = alone(single, index)
        own = refined(single, own_start, own_control)
        noun = group.nouns[0]
        assert not torch.allclose(batched[:, noun], start[:, noun], atol=1e-3)  # the token did move
        torch.testing.assert_close(batched[:, noun], own[:, noun], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.anchor_latents[index], single.anchor_latents[0], rtol=1e-4, atol=1e-4)
        assert trace[group.phrase] == pytest.approx(single.summary()["binding_loss_trace"][group.phrase], rel=1e-4)
        assert [h["accepted"] for h in together.history if h["group"] == index] == [
            h["accepted"] for h in single.history]
    others = [p for p in range(start.shape[1]) if p not in {g.nouns[0] for g in together.groups}]
    assert torch.equal(batched[:, others], start[:, others])
