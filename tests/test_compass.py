"""Compass Control: token insertion, encoders, coupled attention localisation, checkpoints, training."""
from __future__ import annotations

import pickle

import pytest
import torch

from pipelines.base import PipelineError
from pipelines.diffusion.attention import AttentionControl, cross_attention_layers
from pipelines.diffusion.compass import (PLACEHOLDER, CompassEncoder, CompassObject, PhraseCompassEncoder,
                                         apply_compass, insert_compass_tokens, load_official_compass,
                                         lora_diffusion_to_peft, outside_box_mask, parse_compass_objects, square_box,
                                         write_compass_embeddings)
from pipelines.tiny import tiny_sd15_pipeline


@pytest.fixture
def pipe():
    return tiny_sd15_pipeline(seed=0)


def test_compass_token_is_inserted_right_before_each_object_token(pipe):
    objects = [CompassObject("cat", 90), CompassObject("dog", 270)]
    write_compass_embeddings(pipe.tokenizer, pipe.text_encoder, PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer),
                             objects)
    compass = insert_compass_tokens("a photo of a cat and a dog", objects, pipe.tokenizer)
    ids = pipe.tokenizer(compass.text)["input_ids"]
    assert compass.text == f"a photo of a {PLACEHOLDER.format(0)} cat and a {PLACEHOLDER.format(1)} dog"
    for index, (compass_pos, object_pos) in enumerate(compass.pairs):
        assert ids[compass_pos] == pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER.format(index))
        assert object_pos == compass_pos + 1
    assert pipe.tokenizer.decode([ids[compass.pairs[0][1]]]).strip() == "cat"
    assert pipe.tokenizer.decode([ids[compass.pairs[1][1]]]).strip() == "dog"


def test_object_missing_from_prompt_is_a_clear_error(pipe):
    write_compass_embeddings(pipe.tokenizer, pipe.text_encoder, CompassEncoder(16), [CompassObject("car", 0)])
    with pytest.raises(PipelineError, match="does not appear in the prompt"):
        insert_compass_tokens("a photo of a cat", [CompassObject("car", 0)], pipe.tokenizer)


@pytest.mark.parametrize("make", ["phrase", "mlp"])
def test_encoders_are_continuous_and_360_periodic(pipe, make):
    torch.manual_seed(0)
    encoder = PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer) if make == "phrase" else CompassEncoder(16)
    with torch.no_grad():
        angles = torch.tensor([0.0, 360.0, 37.0, 397.0, -23.0, 337.0])
        out = encoder(angles)
        assert torch.allclose(out[0], out[1], atol=1e-5)
        assert torch.allclose(out[2], out[3], atol=1e-5)
        assert torch.allclose(out[4], out[5], atol=1e-5)
        fine = encoder(torch.arange(0, 360, 0.5))
    steps = (fine[1:] - fine[:-1]).norm(dim=-1)
    spread = (fine - fine.mean(0)).norm(dim=-1).max()
    assert steps.max() < 0.05 * spread  # no jumps: a half-degree step moves the token a little
    assert spread > 0  # and different angles give different tokens


def test_square_box_is_enlarged_squared_and_clipped():
    x0, y0, x1, y1 = square_box((0.2, 0.4, 0.4, 0.5))
    assert (x1 - x0) == pytest.approx(0.24) and (y1 - y0) == pytest.approx(0.24)
    assert (x0 + x1) / 2 == pytest.approx(0.3) and (y0 + y1) / 2 == pytest.approx(0.45)
    assert square_box((0.0, 0.0, 1.0, 1.0)) == (0.0, 0.0, 1.0, 1.0)


def test_attention_of_compass_and_object_tokens_outside_their_box_is_zero(pipe):
    objects = [CompassObject("cat", 90, (0.0, 0.0, 0.4, 0.4)), CompassObject("dog", 200, (0.5, 0.5, 1.0, 1.0))]
    control = AttentionControl(pipe.unet)
    stacks = [(pipe.tokenizer, pipe.text_encoder, PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer))]
    compass = apply_compass(control, stacks, "a photo of a cat and a dog", objects)
    tokens = [p for pair in compass.pairs for p in pair]
    recorder = control.record(tokens=tokens)
    with control:
        pipe(compass.text, num_inference_steps=2, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=control.step_callback)
    assert set(recorder.maps[0]) == set(control.layers)  # every cross-attention layer was hooked
    for layer_maps in recorder.maps.values():
        for probs in layer_maps.values():  # [rows, h, w, 4 tokens]
            h, w = probs.shape[1:3]
            for index, obj in enumerate(objects):
                outside = control.region_mask(outside_box_mask(square_box(obj.box)), h * w).view(h, w)
                assert outside.any() and (~outside).any()
                for column in (2 * index, 2 * index + 1):
                    assert probs[:, outside, column].abs().max() == 0
                    assert probs[:, ~outside, column].sum() > 0


def write_official_checkpoint(folder, unet, linears):
    """A randomly initialised checkpoint in the released format: args.pkl + training_state_<step>.pth."""
    torch.manual_seed(1)
    encoder = CompassEncoder(16)
    lora = {}
    for name in linears:
        module = unet.get_submodule(name)
        lora[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features)
        lora[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4)
    state = {"merger": {"model": {**encoder.state_dict(), "gaussian_fourier_embedding.W": torch.randn(8)}},
             "unet": {"lora": lora}}
    torch.save(state, folder / "training_state_20000.pth")
    with open(folder / "args.pkl", "wb") as handle:
        pickle.dump({"merged_emb_dim": 16, "lora_rank": 4, "train_unet": True}, handle)
    return encoder, lora


def test_official_checkpoint_in_the_image_pipeline_applies_its_lora_only_to_compass_runs(store, tmp_path):
    from pipelines.tabs.image import ImagePipeline, ImageRequest

    pipeline = ImagePipeline(store, "tiny")
    unet = pipeline.load("").pipe.unet
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    write_official_checkpoint(tmp_path, unet, [layer])
    plain = ImageRequest(prompt="a red hat on a table", steps=2, seed=5, preview_every=0)
    before = pipeline.run(plain)
    objects = '[{"name": "hat", "angle": 90, "box": [0, 0, 0.5, 0.5]}]'
    pipeline.run(ImageRequest(prompt="a red hat on a table", steps=2, seed=5, preview_every=0, compass=objects,
                              compass_encoder=str(tmp_path)))
    assert unet.get_submodule(layer).disable_adapters is False  # the LoRA ran for the compass request
    after = pipeline.run(plain)
    assert unet.get_submodule(layer).disable_adapters is True
    from PIL import Image

    assert Image.open(before.value[0]).tobytes() == Image.open(after.value[0]).tobytes()


def test_official_checkpoint_format_round_trips(pipe, tmp_path):
    linears = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
               "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    encoder, lora = write_official_checkpoint(tmp_path, pipe.unet, linears)

    loaded = load_official_compass(tmp_path, unet=pipe.unet)
    angles = torch.tensor([0.0, 45.0, 300.0])
    assert torch.equal(loaded(angles), encoder(angles))
    for name in linears:
        module = pipe.unet.get_submodule(name)
        assert torch.equal(module.lora_A["compass"].weight, lora[f"{name}.lora_down.weight"])
        assert torch.equal(module.lora_B["compass"].weight, lora[f"{name}.lora_up.weight"])
        x = torch.randn(2, module.in_features)
        expected = module.base_layer(x) + x @ lora[f"{name}.lora_down.weight"].T @ lora[f"{name}.lora_up.weight"].T
        assert torch.allclose(module(x), expected, atol=1e-5)


def test_args_pickle_that_imports_code_is_refused(tmp_path):
    with open(tmp_path / "args.pkl", "wb") as handle:
        pickle.dump({"merged_emb_dim": 16, "hook": print}, handle)
    torch.save({}, tmp_path / "training_state_1.pth")
    with pytest.raises(PipelineError, match="refusing"):
        load_official_compass(tmp_path)


def test_lora_key_conversion_to_peft_names():
    converted = lora_diffusion_to_peft({"a.to_q.lora_down.weight": torch.ones(1),
                                        "a.to_q.lora_up.weight": torch.ones(1),
                                        "a.to_q.linear.weight": torch.ones(1)})
    assert set(converted) == {"a.to_q.lora_A.weight", "a.to_q.lora_B.weight"}


@pytest.mark.parametrize("text, message", [
    ("[{", "must be JSON"), ('{"name": "car"}', "JSON list"), ('[{"angle": 3}]', "non-empty"),
    ('[{"name": "car", "angle": "north"}]', "number of degrees"), ('[{"name": "car", "box": [0, 0, 2, 1]}]', "box"),
])
def test_malformed_objects_give_clear_errors(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_compass_objects(text)


def test_objects_parse_with_angles_wrapped_to_one_turn():
    objects = parse_compass_objects('[{"name": "car", "angle": 450, "box": [0, 0.5, 0.5, 1]}]')
    assert objects == [CompassObject("car", 90.0, (0.0, 0.5, 0.5, 1.0))]


def test_training_script_reduces_its_loss_on_a_tiny_synthetic_set(tmp_path):
    from pipelines.diffusion.compass_train import load_trained_compass, main

    report = main(["--model", "tiny", "--synthetic", "6", "--steps", "40", "--lr", "3e-3", "--lora-rank", "2",
                   "--out", str(tmp_path / "ckpt")])
    assert report["final_loss"] < report["initial_loss"]
    encoder = load_trained_compass(tmp_path / "ckpt")
    assert encoder(torch.tensor([10.0])).shape == (1, 16)
    assert (tmp_path / "ckpt" / "unet_lora.safetensors").is_file()


def test_image_pipeline_applies_call_on_every_cross_attention_layer_and_step(store):
    from pipelines.tabs.image import ImagePipeline, ImageRequest

    pipeline = ImagePipeline(store, "tiny")
    unet = pipeline.load("").pipe.unet
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    objects = '[{"name": "hat", "angle": 45, "box": [0.1, 0.1, 0.6, 0.6]}]'
    try:
        result = pipeline.run(ImageRequest(prompt="a red hat on a table", steps=3, seed=3, compass=objects,
                                           preview_every=0))
    finally:
        hook.remove()
    compass = result.metadata["controls"]["compass"]
    assert compass[0]["name"] == "hat" and compass[0]["tokens"][1] == compass[0]["tokens"][0] + 1
    # one object: its bias is applied in every cross-attention layer at every UNet call
    assert result.stats["biased_attention_calls"] == len(cross_attention_layers(unet)) * len(calls)
    baseline = pipeline.run(ImageRequest(prompt="a red hat on a table", steps=3, seed=3, preview_every=0))
    assert result.metadata["parameters"]["seed"] == baseline.metadata["parameters"]["seed"]
    assert baseline.stats["biased_attention_calls"] == 0


def test_compass_token_key_gets_its_object_token_key_added(pipe):
    """class2special_soft (official inference and training): key[compass] += key[object], conditional rows only."""
    objects = [CompassObject("cat", 90), CompassObject("dog", 270)]
    control = AttentionControl(pipe.unet)
    stacks = [(pipe.tokenizer, pipe.text_encoder, PhraseCompassEncoder(pipe.text_encoder, pipe.tokenizer))]
    compass = apply_compass(control, stacks, "a photo of a cat and a dog", objects)
    assert [(s.target, s.source) for s in control.key_shares] == compass.pairs
    control.biases.clear()  # the key share alone
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    attn = pipe.unet.get_submodule(name)
    hidden = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))
    control.latent_hw = (4, 4)
    with torch.no_grad():
        stock = attn(hidden, encoder_hidden_states=context)
        with control:
            shared = attn(hidden, encoder_hidden_states=context)
        key = attn.to_k(context)
        for compass_pos, object_pos in compass.pairs:
            key[1, compass_pos] += key[1, object_pos]  # row 1 is the conditional half of a CFG batch
        heads = attn.heads
        split = lambda x: x.view(2, -1, heads, x.shape[-1] // heads).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(attn.to_q(hidden)), split(key),
                                                               split(attn.to_v(context)))
        expected = attn.to_out[0](out.transpose(1, 2).reshape(2, -1, key.shape[-1]))
    assert torch.allclose(shared, expected, atol=1e-6)
    assert torch.equal(shared[0], stock[0]) and not torch.allclose(shared[1], stock[1])


def test_compass_training_uses_the_key_share_as_inference_does(tmp_path, monkeypatch):
    from pipelines.diffusion import compass_train

    shared_layers = []
    original = AttentionControl.share_keys

    def spy(self, name, key):
        shared = original(self, name, key)
        if not torch.equal(shared, key):
            shared_layers.append(name)
        return shared

    monkeypatch.setattr(AttentionControl, "share_keys", spy)
    rows = compass_train.synthetic_rows(1, tmp_path, 32)
    pipe = tiny_sd15_pipeline(seed=0)
    trainer = compass_train.CompassTrainer(pipe, 16)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    trainer.loss(rows[0], 32, noise, torch.tensor([500]))
    assert sorted(set(shared_layers)) == sorted(cross_attention_layers(pipe.unet))


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 8, 16])
def test_every_box_keeps_at_least_one_cell_on_every_grid(pipe, side):
    """A box can be smaller than a cell of a coarse grid (64 px: grids 16/8/4/2): its CALL mask must still leave
    it at least one cell, or the compass and object tokens get no attention at all on that layer."""
    control = AttentionControl(pipe.unet)
    control.latent_hw = (side, side)
    generator = torch.Generator().manual_seed(side)
    boxes = [(0.1, 0.1, 0.35, 0.35), (0.45, 0.45, 0.55, 0.55), (0.6, 0.05, 0.62, 0.07), (0.0, 0.9, 1.0, 1.0)]
    for _ in range(40):
        x0, y0 = (torch.rand(2, generator=generator) * 0.9).tolist()
        w, h = (torch.rand(2, generator=generator) * 0.3 + 0.005).tolist()
        boxes.append((x0, y0, min(1.0, x0 + w), min(1.0, y0 + h)))
    for box in boxes:
        biased = control.region_mask(outside_box_mask(square_box(box)), side * side)
        assert not biased.all(), (box, side)
    large = control.region_mask(outside_box_mask(square_box((0.0, 0.0, 0.5, 0.5))), side * side).view(side, side)
    if side >= 4:  # on grids finer than the box, the box's own cells stay exactly its cells
        assert not large[: side // 2 - 1, : side // 2 - 1].any() and large[side // 2 + 1:, :].all()
