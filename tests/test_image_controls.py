"""Image tab on tiny SD1.5/SDXL: controls off is the stock pipeline bit for bit; each control acts at its hook."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base import Partial, Result
from pipelines.diffusion.attention import AttentionControl, KeyBias, cross_attention_layers
from pipelines.diffusion.binding import (BindingConfig, SemanticBinding, composite_tokens, end_token_substitution,
                                         group_tokens)
from pipelines.diffusion.leakfix import encoded_alone, isolate_items
from pipelines.diffusion.lpa import layer_tags, route_style_tokens
from pipelines.diffusion.models import scheduled_pipe
from pipelines.tabs.image import ImagePipeline, ImageRequest
from pipelines.diffusion.prompts import encode_positive, parse_prompt
from pipelines.models import ModelStore
from pipelines.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a [red hat] and a [blue car] in watercolor style"
TINY = {"sd15": "tiny-sd15 (random weights)", "sdxl": "tiny-sdxl (random weights)"}


@pytest.fixture(scope="module")
def image_pipeline():
    return ImagePipeline(ModelStore(packaged={}), "tiny")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request):
    return request.param


def stock_images(arch: str, prompt: str, seed: int, steps: int = 3, batch: int = 1) -> np.ndarray:
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
               num_images_per_prompt=batch, generator=generators, output_type="pil")
    return np.stack([np.asarray(im) for im in out.images])


def load_png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_controls_off_is_bit_identical_to_stock_pipeline(image_pipeline, arch, monkeypatch):
    monkeypatch.setattr(image_pipeline, "preview_interval_s", 0.0)
    request = ImageRequest(prompt="a red hat and a blue car", model=TINY[arch], steps=3, seed=11, batch_size=2)
    events = list(image_pipeline.generate(request))
    result = events[-1]
    ours = np.stack([load_png(p) for p in result.value])
    assert np.array_equal(ours, stock_images(arch, "a red hat and a blue car", 11, batch=2))
    assert sum(isinstance(e, Partial) for e in events) == 2  # live previews of steps 1 and 2
    assert result.stats["biased_attention_calls"] == 0
    parameters = json.loads(Image.open(result.value[1]).text["parameters"])
    assert parameters["seed"] == 12 and parameters["steps"] == 3 and parameters["prompt"] == request.prompt


def test_heatmap_recording_leaves_the_image_bit_identical(image_pipeline):
    request = ImageRequest(prompt="a red hat and a blue car", model=TINY["sd15"], steps=3, seed=5,
                           heatmap_words="hat, car")
    result = image_pipeline.run(request)
    assert np.array_equal(load_png(result.value[0]), stock_images("sd15", "a red hat and a blue car", 5)[0])
    assert [caption for _, caption in result.metadata["heatmaps"]] == ["image #1: hat", "image #1: car"]


def test_installed_but_idle_control_keeps_stock_output_and_restores_processors():
    pipe = tiny_sd15_pipeline()
    before = dict(pipe.unet.attn_processors)
    sample, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    text = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = pipe.unet(sample, t, text).sample
        control = AttentionControl(pipe.unet)
        control.biases.append(KeyBias(tokens=[3], timesteps=(0, 10)))  # outside the window: idle
        with control:
            idle = pipe.unet(sample, t, text).sample
    assert torch.equal(stock, idle)
    assert control.applied == []
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_key_bias_masks_chosen_columns_in_chosen_region_and_layers():
    pipe = tiny_sd15_pipeline()
    layer = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    region = torch.zeros(16, 16)
    region[:, :8] = 1  # left half of the image
    control = AttentionControl(pipe.unet)
    control.cfg = False
    control.biases.append(KeyBias(tokens=[3, 4], layers={layer}, region=region, label="test"))
    recorder = control.record(layers={layer, "down_blocks.0.attentions.0.transformer_blocks.0.attn2"})
    text = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), control:
        pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor(400), text)
    maps = recorder.maps[0][layer][0]  # [h, w, tokens]
    assert maps.shape == (16, 16, 77)
    assert torch.all(maps[:, :8, 3:5] == 0) and torch.all(maps[:, 8:, 3:5] > 0)
    other = recorder.maps[0]["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0]
    assert torch.all(other[..., 3:5] > 0)
    assert [(a.layer, a.tokens, a.queries) for a in control.applied] == [(layer, (3, 4), 128)]


def test_cfg_bias_touches_only_the_conditional_half():
    pipe = tiny_sd15_pipeline()
    control = AttentionControl(pipe.unet)
    control.biases.append(KeyBias(tokens=[2]))
    recorder = control.record(tokens=[2])
    recorder.rows = "all"
    with torch.no_grad(), control:
        pipe.unet(torch.randn(2, 4, 16, 16), torch.tensor(400), torch.randn(2, 77, 16))
    for probs in recorder.maps[0].values():
        assert torch.all(probs[0] > 0) and torch.all(probs[1] == 0)


def test_lpa_routes_by_role_on_sd15_and_sdxl():
    sd15 = layer_tags(cross_attention_layers(tiny_sd15_pipeline().unet))
    sdxl = layer_tags(cross_attention_layers(tiny_sdxl_pipeline().unet))
    blocks = lambda tags, tag: sorted({n.split(".attentions")[0] for n, t in tags.items() if t == tag})
    assert blocks(sd15, "down1") == ["down_blocks.0"] and blocks(sd15, "up2") == ["up_blocks.2", "up_blocks.3"]
    assert blocks(sdxl, "down1") == ["down_blocks.1"] and blocks(sdxl, "up2") == ["up_blocks.1"]
    assert blocks(sdxl, "up1") == ["up_blocks.0"] and blocks(sdxl, "mid") == ["mid_block"]


def test_lpa_suppresses_content_on_style_layers_only_inside_the_window(image_pipeline, arch):
    request = ImageRequest(prompt=PROMPT, model=TINY[arch], steps=10, seed=1, lpa=True)
    model = image_pipeline.load(request.model)
    pipe = scheduled_pipe(model, "default")
    control = AttentionControl(pipe.unet)
    parsed = parse_prompt(PROMPT)
    info: dict = {}
    call = dict(num_inference_steps=10, guidance_scale=7.5, height=32, width=32, num_images_per_prompt=1,
                generator=[torch.Generator().manual_seed(1)])
    image_pipeline.prepare_controls(pipe, model.arch, request, parsed, control, call, info)
    content, style = info["controls"]["lpa"]["content_tokens"], info["controls"]["lpa"]["style_tokens"]
    with control:
        pipe(**call, callback_on_step_end=control.step_callback)
    tags = layer_tags(control.layers)
    assert control.applied
    for applied in control.applied:
        assert 300 <= applied.timestep <= 650
        expected = (content, {"up2"}) if applied.label.startswith("lpa: content") else (style, {"down1", "mid"})
        assert list(applied.tokens) == expected[0] and tags[applied.layer] in expected[1]
    steps_hit = {a.step for a in control.applied}
    in_window = {i for i, t in enumerate(pipe.scheduler.timesteps.tolist()) if 300 <= t <= 650}
    assert steps_hit == in_window


def test_lpa_biases_mask_keys_with_minus_infinity():
    biases = route_style_tokens(["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                 "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                 "up_blocks.3.attentions.0.transformer_blocks.0.attn2"], [2, 3], [7])
    assert all(b.value == float("-inf") for b in biases)
    assert biases[0].layers == {"up_blocks.3.attentions.0.transformer_blocks.0.attn2"}
    assert biases[1].layers == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2"}
    assert biases[0].timesteps == (300.0, 650.0) and biases[1].tokens == [7]


def test_composite_token_and_end_token_substitution_values():
    pipe = tiny_sd15_pipeline()
    parsed = parse_prompt("a [red fedora] and a [blue sportscar]")  # nouns the tiny vocab splits into pieces
    groups = group_tokens(pipe.tokenizer, parsed)
    assert [(g.nouns, g.attributes) for g in groups] == [([3, 4, 5, 6, 7], [2]), ([11, 12, 13, 14, 15, 16], [10])]
    embeds = torch.randn(1, 77, 16)
    merged = composite_tokens(embeds, groups, BindingConfig(cap_composite_norm=False))  # the official merge
    assert torch.allclose(merged[0, 3], 1.1 * embeds[0, 3:8].sum(0) + 1.2 * embeds[0, 2])
    assert torch.allclose(merged[0, 11], 1.1 * embeds[0, 11:17].sum(0) + 1.2 * embeds[0, 10])
    assert torch.all(merged[0, [2, 4, 5, 6, 7, 10, 12, 13, 14, 15, 16]] == 0)
    assert torch.equal(merged[0, 17:], embeds[0, 17:])
    other = torch.randn(1, 77, 16)
    swapped = end_token_substitution(merged, other, prompt_length=16)
    assert torch.equal(swapped[0, :17], merged[0, :17]) and torch.equal(swapped[0, 17:], other[0, 17:])


def test_automatic_groups_without_brackets():
    parsed = parse_prompt("a white cat wearing black sunglasses, a green bench in watercolor style")
    assert [(g.noun.text, [a.text for a in g.attributes]) for g in parsed.groups] == [
        ("cat", ["white"]), ("sunglasses", ["black"]), ("bench", ["green"])]
    assert parsed.style.text == "watercolor"


def test_binding_losses_decrease_over_refinement_iterations(arch):
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    parsed = parse_prompt("a [red hat] and a [blue car]")
    control = AttentionControl(pipe.unet)
    config = BindingConfig(token_step_size=0.5, scale_factor=0.005, attention_refinement_steps=(4, 4),
                           thresholds={0: -1e9}, token_control_steps=50, attention_control_steps=50)
    binding = SemanticBinding(pipe, arch, control, parsed, steps=10, config=config)
    pipe.scheduler.set_timesteps(10)
    pipe._guidance_scale = 7.5
    positive = encode_positive(pipe, parsed.text, 1)
    negative = encode_positive(pipe, "", 1)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    positive = binding.prepare(positive, negative, latents, 32, 32)
    with control:
        new_latents, new_positive = binding.refine(1, pipe.scheduler.timesteps[1], latents, positive)
    entropy = [h["value"] for h in binding.history if h["loss"] == "entropy"]
    assert len(entropy) == 4 and all(b < a for a, b in zip(entropy, entropy[1:]))
    for group in range(2):  # three gradient steps, each scored by the next evaluation (the last without gradient)
        token = [h["value"] for h in binding.history if h["loss"] == "binding" and h["group"] == group]
        assert len(token) == 4 and all(b < a for a, b in zip(token, token[1:]))
    assert not torch.equal(new_latents, latents) and not torch.equal(new_positive, positive)


def test_leakfix_with_the_papers_placement_patches_item_vectors_with_its_alone_encoding(arch):
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    text = "a pool by a table"
    positive = encode_positive(pipe, text, 1)
    patched, where = isolate_items(pipe, text, ["table"], positive, encode_item=encoded_alone)
    alone = encode_positive(pipe, "table", 1)
    positions = where["table"]
    assert torch.equal(patched[0, positions], alone[0, 1:1 + len(positions)])
    untouched = [i for i in range(77) if i not in positions]
    assert torch.equal(patched[0, untouched], positive[0, untouched])
    assert not torch.equal(patched[0, positions], positive[0, positions])


def test_served_leakfix_reads_the_pipelines_layer_at_the_items_own_positions(arch):
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    text = "pool by a table"
    positive = encode_positive(pipe, text, 2)
    with torch.no_grad():
        patched, where = isolate_items(pipe, text, ["pool", "table"], positive)
    alone = encode_positive(pipe, "table", 1)
    first, second = where["pool"], where["table"]
    assert first == [1] and torch.allclose(patched[:, first], positive[:, first], atol=1e-5)  # nothing before it
    assert not torch.allclose(patched[:, second], positive[:, second], atol=1e-3)  # the earlier words are not read
    assert not torch.allclose(patched[0, second], alone[0, 1:1 + len(second)], atol=1e-3)  # nor is it at 1..n
    untouched = [i for i in range(77) if i not in first + second]
    assert torch.equal(patched[:, untouched], positive[:, untouched])


def test_controlled_run_with_compare_reports_ab_and_overhead(image_pipeline):
    request = ImageRequest(prompt=PROMPT, model=TINY["sd15"], steps=4, seed=2, binding=True, lpa=True,
                           isolate="car", compare="controls off", heatmap_words="hat")
    result = image_pipeline.run(request)
    baseline = load_png(result.baseline.value[0])
    assert np.array_equal(baseline, stock_images("sd15", parse_prompt(PROMPT).text, 2, steps=4)[0])
    assert not np.array_equal(baseline, load_png(result.value[0]))
    assert result.stats["time_ratio_vs_baseline"] > 0 and result.stats["binding_groups"] == 2
    assert (result.stats["compare"] == "controls off"
            and result.stats["baseline_time_s"] == result.baseline.stats["time_s"])
    assert len(result.metadata["heatmaps"]) == 1 and len(result.baseline.metadata["heatmaps"]) == 1


def test_stop_interrupts_within_a_step(image_pipeline):
    request = ImageRequest(prompt="a red hat", model=TINY["sd15"], steps=50, seed=1)
    events = image_pipeline.generate(request)
    seen = 0
    with pytest.raises(Exception) as stopped:
        for event in events:
            if isinstance(event, Partial):
                seen += 1
                request.cancel.cancel()
            assert not isinstance(event, Result)
    assert type(stopped.value).__name__ == "Cancelled" and seen <= 2


@pytest.mark.parametrize("controls", [dict(lpa=True), dict(binding=True)], ids=["lpa", "binding"])
def test_batch_of_two_works_with_controls_and_seeds_each_image(image_pipeline, arch, controls):
    request = ImageRequest(prompt=PROMPT, model=TINY[arch], steps=2, seed=21, batch_size=2, **controls)
    batch = image_pipeline.run(request)
    assert len(batch.value) == 2 and batch.stats["images"] == 2
    seeds = [json.loads(Image.open(path).text["parameters"])["seed"] for path in batch.value]
    assert seeds == [21, 22]
    images = [load_png(path) for path in batch.value]
    assert not np.array_equal(images[0], images[1])
    if controls.get("lpa"):  # LPA acts per row: image i is the single-image run with seed + i
        for index, image in enumerate(images):
            alone = image_pipeline.run(ImageRequest(prompt=PROMPT, model=TINY[arch], steps=2, seed=21 + index,
                                                    **controls))
            assert np.abs(load_png(alone.value[0]).astype(int) - image.astype(int)).max() <= 1


def test_ets_step_outside_minus_one_to_last_step_is_refused(image_pipeline):
    from pipelines.base import PipelineError

    for ets_step in (-10**9, -2, 2, 10**300):
        with pytest.raises(PipelineError, match="End-token substitution step must be between -1 and 1"):
            image_pipeline.run(ImageRequest(prompt=PROMPT, model=TINY["sd15"], steps=2, seed=1, binding=True,
                                            ets_step=ets_step))
