"""Micro-world v2 compass training attends as inference does: every row's compass token key gets that row's object
token key added (``class2special_soft``) in every cross-attention layer, exactly what the image tab computes for the
same prompt."""
from __future__ import annotations

import copy

import torch

from pipelines.diffusion.attention import AttentionControl, cross_attention_layers
from pipelines.diffusion.compass import PLACEHOLDER, PhraseCompassEncoder, apply_compass

TINY = ["--device", "cpu", "--dtype", "fp32", "--size", "32", "--text-width", "32", "--text-layers", "2",
        "--vision-layers", "1", "--vae-channels", "8,16,16", "--unet-channels", "16,16,16,16",
        "--layers-per-block", "1", "--head-dim", "8", "--norm-groups", "4", "--compass-batch", "4",
        "--max-steps", "1", "--log-every", "1", "--no-samples"]


def tiny_models():
    """Random-weight v2 parts (the share is a property of the attention, not of trained weights)."""
    from pipelines.microworld import text_v2
    from pipelines.microworld.train_v2 import Models, build_unet, build_vae, parse_args

    config = parse_args(TINY)
    torch.manual_seed(0)
    tokenizer = text_v2.build_tokenizer()
    clip = text_v2.build_clip(tokenizer, config.text_width, config.text_layers, config.vision_layers, config.size)
    models = Models(tokenizer=tokenizer, text_encoder=text_v2.text_encoder_of(clip), vae=build_vae(config).eval(),
                    unet=build_unet(config, config.text_width))
    return models, config


def test_compass_v2_training_adds_each_rows_object_key_to_its_compass_key_as_inference_does(monkeypatch):
    from pipelines.microworld import compass_v2
    from pipelines.microworld.train_v2 import Budget

    models, config = tiny_models()
    calls, batches = [], []
    share_keys, make_batch = AttentionControl.share_keys, compass_v2.compass_batch

    def spy(self, name, key):
        shared = share_keys(self, name, key)
        calls.append((name, key.detach().clone(), shared.detach().clone()))
        return shared

    def record_batch(*args):
        batches.append(make_batch(*args))
        return batches[-1]

    monkeypatch.setattr(AttentionControl, "share_keys", spy)
    monkeypatch.setattr(compass_v2, "compass_batch", record_batch)
    compass_v2.train_compass(models, config, torch.device("cpu"), Budget(0))
    monkeypatch.setattr(AttentionControl, "share_keys", share_keys)

    batch = batches[0]
    tokenizer = copy.deepcopy(models.tokenizer)
    tokenizer.add_tokens([PLACEHOLDER.format(0)])
    placeholder = tokenizer.convert_tokens_to_ids(PLACEHOLDER.format(0))
    compass_at = [int((row == placeholder).nonzero()) for row in batch["ids"]]
    assert len(set(compass_at)) > 1  # rows hold different captions: one prompt's positions cannot serve them all
    assert sorted(name for name, _, _ in calls) == sorted(cross_attention_layers(models.unet))
    for name, key, shared in calls:
        expected = key.clone()
        for row, position in enumerate(compass_at):
            expected[row, position] += key[row, position + 1]  # the object word follows its compass token
        assert torch.equal(shared, expected), name

    # The image tab, given row i's caption and object, computes the same key on its conditional (CFG) row.
    text_encoder = copy.deepcopy(models.text_encoder)
    encoder = PhraseCompassEncoder(text_encoder, tokenizer)
    for row, (prompt, obj) in enumerate(zip(batch["prompts"], batch["objects"])):
        control = AttentionControl(models.unet)
        caption = prompt.text.replace(f"{PLACEHOLDER.format(0)} ", "", 1)
        served = apply_compass(control, [(tokenizer, text_encoder, encoder)], caption, [obj])
        assert served.text == prompt.text and served.pairs == prompt.pairs
        for name, key, shared in calls:
            cfg_pair = control.share_keys(name, torch.stack([key[row], key[row]]))
            assert torch.equal(cfg_pair[1], shared[row]) and torch.equal(cfg_pair[0], key[row]), name
