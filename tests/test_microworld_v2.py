"""Micro-world v2: the batched renderer, the held-out split, the causal EOT-pooled text encoder and the scorer
(precision and validity: noise must not score)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.microworld import scenes_v2
from pipelines.microworld.scorer_v2 import score_image


@pytest.fixture(scope="module")
def rendered():
    layouts = scenes_v2.sample_layouts(24, 7)
    images, coverage = scenes_v2.render_layouts(layouts)
    return layouts, images, coverage, scenes_v2.truths(layouts, coverage)


def test_scenes_are_reproducible_and_objects_never_touch(rendered):
    layouts, images, coverage, _ = rendered
    again, _ = scenes_v2.render_layouts(scenes_v2.sample_layouts(24, 7))
    assert torch.equal(images, again)
    assert set(layouts.count.tolist()) <= {1, 2, 3} and images.shape == (24, 3, 128, 128)
    assert ((coverage > 0).sum(1) <= 1).all()  # no pixel is covered by two objects
    for k in range(scenes_v2.MAX_OBJECTS):
        absent = torch.as_tensor(k >= layouts.count)
        assert (coverage[absent, k] == 0).all()


def test_boxes_hold_each_object_and_flat_fills_wear_their_palette_colour(rendered):
    layouts, images, coverage, truths = rendered
    pixels = scenes_v2.to_uint8(images)
    for i, truth in enumerate(truths):
        assert len(truth["objects"]) == layouts.count[i]
        for k, obj in enumerate(truth["objects"]):
            x0, y0, x1, y1 = obj["box"]
            drawn = (coverage[i, k] >= 0.5).nonzero()
            assert drawn[:, 0].min() == y0 and drawn[:, 0].max() == y1
            assert drawn[:, 1].min() == x0 and drawn[:, 1].max() == x1
            cx, cy = (int(v) for v in obj["center"])
            if obj["shape"] in ("circle", "square") and obj["style"] == "flat":
                assert tuple(pixels[i, cy, cx]) == scenes_v2.PALETTE[obj["colour"]]
            if obj["style"] == "outline" and obj["shape"] == "circle":
                assert tuple(pixels[i, cy, cx]) == scenes_v2.BACKGROUND


def test_arrow_points_along_its_heading():
    layouts = scenes_v2.sample_layouts(1, 0)
    layouts.count[:] = 1
    layouts.shape[0, 0], layouts.style[0, 0] = scenes_v2.SHAPES.index("arrow"), 0
    layouts.center[0, 0], layouts.radius[0, 0] = (64, 64), 30
    for heading, (dx, dy) in ((0, (1, 0)), (90, (0, -1)), (180, (-1, 0)), (270, (0, 1))):
        layouts.heading[0, 0] = heading
        _, coverage = scenes_v2.render_layouts(layouts)
        tip, tail = coverage[0, 0, 64 + 25 * dy, 64 + 25 * dx], coverage[0, 0, 64 - 25 * dy, 64 - 25 * dx]
        wide_head = coverage[0, 0, 64 + 8 * dy + 12 * dx, 64 + 8 * dx - 12 * dy]
        assert tip == 1 and tail == 1 and wide_head == 1  # the shaft reaches the tail; only the head is wide
        wide_tail = coverage[0, 0, 64 - 20 * dy + 12 * dx, 64 - 20 * dx - 12 * dy]
        assert wide_tail == 0


def test_swapped_combinations_are_held_out_of_training_and_the_prior_is_skewed():
    train = scenes_v2.sample_layouts(4000, 1)
    assert not scenes_v2.swapped(train.shape, train.colour, train.count).any()
    held = scenes_v2.sample_layouts(200, 2, held_out=True)
    assert scenes_v2.swapped(held.shape, held.colour, held.count).all()
    present = np.arange(scenes_v2.MAX_OBJECTS) < train.count[:, None]
    favourite = np.array([scenes_v2.COLOURS.index(scenes_v2.FAVOURITE[s]) for s in scenes_v2.SHAPES])
    share = (train.colour == favourite[train.shape])[present].mean()
    assert 0.5 < share < 0.7
    prompts = scenes_v2.swapped_prompts()
    assert len(prompts) == 20 and prompts[0][0] == "a blue circle and a red square"


def test_captions_name_headings_next_to_the_noun_and_per_object_styles():
    layouts = scenes_v2.sample_layouts(300, 3)
    captions = [scenes_v2.full_caption(layouts, i) for i in range(300)]
    arrows = [c for c in captions if "arrow" in c]
    assert arrows and all(" arrow pointing " in c for c in arrows)
    per_object = [i for i in range(300) if scenes_v2.STYLE_MODES[layouts.mode[i]][0] == "per-object"]
    assert any("striped " in captions[i] or "dotted " in captions[i] for i in per_object)
    assert all(" style" not in captions[i] for i in per_object)


def test_text_encoder_is_causal_eot_pooled_and_pads_with_eot():
    from pipelines.microworld import text_v2

    tokenizer = text_v2.build_tokenizer()
    for word in scenes_v2.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    encoder = text_v2.text_encoder_of(text_v2.build_clip(tokenizer, width=32, layers=2, vision_layers=1, size=32))
    ids = text_v2.tokenize(tokenizer, ["a red circle and a blue square", "a red circle and a green square"])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids.shape == (2, 77) and (ids[:, 8:] == eot).all() and tokenizer.pad_token_id == eot
    with torch.no_grad():
        out = encoder(ids)
    states = out.last_hidden_state
    changed = 6  # <start> a red circle and a [blue|green]
    assert (ids[0, :changed] == ids[1, :changed]).all() and ids[0, changed] != ids[1, changed]
    assert torch.allclose(states[0, :changed], states[1, :changed], atol=1e-6)
    assert not torch.allclose(states[0, changed:], states[1, changed:], atol=1e-4)
    end = int((ids[0] == eot).nonzero()[0])
    assert torch.allclose(out.pooler_output[0], states[0, end], atol=1e-6)


def tiny_clip_batch(count: int) -> tuple:
    """A tiny CLIP and ``count`` rendered 32 px scenes with their full captions' ids."""
    from pipelines.microworld import text_v2

    tokenizer = text_v2.build_tokenizer()
    clip = text_v2.build_clip(tokenizer, width=32, layers=1, vision_layers=1, size=32)
    layouts = scenes_v2.sample_layouts(count, 4, size=32)
    images, _ = scenes_v2.render_layouts(layouts)
    return clip, images, text_v2.tokenize(tokenizer, [scenes_v2.full_caption(layouts, i) for i in range(count)])


def test_contrastive_step_lowers_the_loss_on_a_fixed_batch():
    from pipelines.microworld import text_v2

    clip, images, ids = tiny_clip_batch(8)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = text_v2.contrastive_loss(clip, ids, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_turned_headings_change_only_the_arrows_direction_words():
    layouts = scenes_v2.sample_layouts(200, 5)
    turned = scenes_v2.turned_headings(layouts, np.random.default_rng(0))
    for i in range(200):
        before, after = scenes_v2.full_caption(layouts, i), scenes_v2.full_caption(turned, i)
        if "arrow" not in before:
            assert after == before
            continue
        assert after != before
        words, turned_words = before.split(), after.split()
        changed = [k for k, (a, b) in enumerate(zip(words, turned_words)) if a != b]
        assert len(words) == len(turned_words) and all(words[k - 1] == "pointing" for k in changed)


def test_hard_negatives_count_only_where_they_differ():
    from pipelines.microworld import text_v2

    clip, images, ids = tiny_clip_batch(6)
    with torch.no_grad():
        plain = text_v2.contrastive_loss(clip, ids, images)
        masked = text_v2.contrastive_loss(clip, ids, images, ids, torch.zeros(6, dtype=torch.bool))
        # a negative the text tower cannot tell from the caption splits each image's choice in two
        blind = text_v2.contrastive_loss(clip, ids, images, ids, torch.ones(6, dtype=torch.bool))
    assert torch.allclose(masked, plain, atol=1e-5)
    assert blind > plain + 0.2


def test_named_headings_mark_each_direction_a_caption_names():
    from pipelines.microworld import text_v2
    from pipelines.microworld.scenes import DIRECTIONS

    named = text_v2.named_headings(["a green arrow pointing up-left and a red arrow pointing down",
                                    "a red circle", "a green arrow pointing right, in dotted style"])
    assert named[0].nonzero().flatten().tolist() == [DIRECTIONS.index("up-left"), DIRECTIONS.index("down")]
    assert not named[1].any() and named[2].nonzero().flatten().tolist() == [DIRECTIONS.index("right")]


def test_heading_probe_reads_the_embedding_the_contrastive_loss_scores_and_learns_directions():
    from pipelines.microworld import text_v2

    clip, images, ids = tiny_clip_batch(24)
    tokenizer = text_v2.build_tokenizer()
    headings = text_v2.named_headings(tokenizer.batch_decode(ids, skip_special_tokens=True))
    assert headings.any(-1).sum() >= 4
    with torch.no_grad():
        out = clip(input_ids=ids, pixel_values=text_v2.pixel_values(images))
        assert torch.allclose(text_v2.sentence_embeds(clip, ids), out.text_embeds, atol=1e-5)
    probe = text_v2.heading_probe(clip)
    parameters = [*clip.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    before = text_v2.probe_accuracy(clip, probe, ids, headings)
    for _ in range(25):
        loss = text_v2.contrastive_loss(clip, ids, images, ids, torch.zeros(len(ids), dtype=torch.bool), probe,
                                        torch.cat([headings, headings]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.9 and text_v2.probe_accuracy(clip, probe, ids, headings) == 1.0


def test_scorer_reads_ground_truth_and_refuses_noise(rendered):
    import importlib

    _, images, _, truths = rendered
    scores = [score_image(image, truth) for image, truth in zip(scenes_v2.to_uint8(images), truths)]
    assert np.mean([s["presence"] for s in scores]) > 0.95 and np.mean([s["binding"] for s in scores]) > 0.95
    assert np.nanmean([s["heading_error"] for s in scores]) < 5
    assert np.nanmean([s["style_agreement"] for s in scores]) > 0.9
    gates = importlib.import_module("benchmarks.microworld_v2_gates")
    noise = [score_image(image, truth) for image, truth in zip(gates.noise_images(12, 128), truths)]
    assert np.mean([s["presence"] for s in noise]) <= 0.1 and not any(s["valid"] for s in noise)


def test_extra_detections_lower_the_score():
    layouts = scenes_v2.sample_layouts(40, 9)
    images, coverage = scenes_v2.render_layouts(layouts)
    truths = scenes_v2.truths(layouts, coverage)
    index = next(i for i in range(40) if layouts.count[i] == 3)
    asked_one = {"objects": truths[index]["objects"][:1]}  # the image has two objects nobody asked for
    score = score_image(scenes_v2.to_uint8(images[index:index + 1])[0], asked_one)
    assert score["found"] == 1 and score["extra_objects"] == 2 and score["presence"] == pytest.approx(0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rendering_matches_the_cpu_and_a_full_size_unet_step_runs():
    """What the device run relies on: the same scenes on both devices, and one bf16 step at the default sizes."""
    from pipelines.microworld.train_v2 import TrainConfig, build_unet

    layouts = scenes_v2.sample_layouts(64, 11)
    on_cpu, _ = scenes_v2.render_layouts(layouts)
    on_gpu, _ = scenes_v2.render_layouts(layouts, "cuda")
    assert (on_cpu - on_gpu.cpu()).abs().max() < 1e-3
    unet = build_unet(TrainConfig(), 256).cuda()
    x, context = torch.randn(256, 4, 32, 32, device="cuda"), torch.randn(256, 77, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = unet(x, torch.randint(0, 1000, (256,), device="cuda"), encoder_hidden_states=context).sample.float()
    loss.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)
