"""Micro-world v3's word readout: the text encoder zeroes exactly the positions from the first end token on, a saved
folder loads through the stock diffusers call with that class, and the image tab serves v3 once it is committed
while the video tab's base stays v2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoders():
    """(tokenizer, v2's plain CLIPTextModel, the same weights as WordReadoutCLIPTextModel), tiny and seeded."""
    from pipelines.microworld import text_v2
    from pipelines.microworld.word_readout import WordReadoutCLIPTextModel, with_readout

    tokenizer = text_v2.build_tokenizer()
    plain = text_v2.text_encoder_of(text_v2.build_clip(tokenizer, width=32, layers=2, vision_layers=1, size=32))
    words = with_readout(plain, "words")
    assert type(words) is WordReadoutCLIPTextModel and with_readout(words, "all").__class__.__name__ == "CLIPTextModel"
    return tokenizer, plain, words


def test_word_readout_zeroes_from_the_first_end_token_and_keeps_the_rest_bit_identical(encoders):
    from pipelines.microworld import text_v2

    tokenizer, plain, words = encoders
    ids = text_v2.tokenize(tokenizer, ["a red circle", "a striped red circle and a green arrow pointing left", ""])
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    firsts = [int((row == eot).nonzero()[0]) for row in ids]
    assert firsts == [4, 11, 1] and (ids[:, -1] == eot).all()  # padded with the end token: the first one counts
    with torch.no_grad():
        base = plain(ids, output_hidden_states=True)
        read = words(ids, output_hidden_states=True)
        as_tuple = words(ids, return_dict=False)
    for row, first in enumerate(firsts):
        assert torch.equal(read.last_hidden_state[row, :first], base.last_hidden_state[row, :first])
        assert (read.last_hidden_state[row, first:] == 0).all()
        assert (base.last_hidden_state[row, first:].abs().sum(-1) > 0).all()  # they were not zero before
        for layer, states in enumerate(read.hidden_states):
            assert torch.equal(states[row, :first], base.hidden_states[layer][row, :first])
            assert (states[row, first:] == 0).all()
    assert torch.equal(read.pooler_output, base.pooler_output)
    assert torch.equal(as_tuple[0], read.last_hidden_state) and torch.equal(as_tuple[1], read.pooler_output)


def tiny_words_folder(folder: Path) -> Path:
    """The tiny SD1.5 pipeline with its text encoder read out on words, saved the way train_v2 saves."""
    from pipelines.microworld.word_readout import with_readout
    from pipelines.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    pipe.register_modules(text_encoder=with_readout(pipe.text_encoder, "words"))
    pipe.save_pretrained(folder)
    return folder


def test_a_words_folder_loads_through_the_stock_pipeline_call_with_the_subclass(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.microworld.word_readout import WordReadoutCLIPTextModel, folder_readout

    folder = tiny_words_folder(tmp_path / "v3")
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == [
        "pipelines.microworld.word_readout", "WordReadoutCLIPTextModel"]
    assert folder_readout(folder) == "words"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.text_encoder) is WordReadoutCLIPTextModel
    embeds, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)
    ids = pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids[0]
    first = int((ids == pipe.tokenizer.eos_token_id).nonzero()[0])
    assert (embeds[0, first:] == 0).all() and (embeds[0, :first].abs().sum(-1) > 0).all()


def complete_folder(folder: Path) -> Path:
    from pipelines.microworld import PARTS

    for part in PARTS:
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text("{}")
    return folder


def test_image_tab_serves_v3_once_committed_and_the_video_base_stays_v2(tmp_path, monkeypatch):
    from pipelines import microworld
    from pipelines.models import ModelSpec, ModelStore
    from pipelines.packaged import PACKAGED_INSTALLED, PACKAGED_RESOLVERS
    from pipelines.presets import MICROWORLD_VIDEO

    v2, v3 = complete_folder(tmp_path / "weights_v2"), tmp_path / "weights_v3"
    monkeypatch.setattr(microworld, "WEIGHTS_V2", v2)
    monkeypatch.setattr(microworld, "WEIGHTS_V3", v3)
    motion = tmp_path / "weights_motion_v2"
    motion.mkdir()
    (motion / "config.json").write_text("{}")
    (motion / "diffusion_pytorch_model.safetensors").write_text("")
    monkeypatch.setattr(microworld, "WEIGHTS_MOTION_V2", motion)
    assert PACKAGED_RESOLVERS["microworld"]() == str(v2)  # no v3: as before
    complete_folder(v3)
    assert PACKAGED_RESOLVERS["microworld"]() == str(v3) and PACKAGED_INSTALLED["microworld"]()
    base = MICROWORLD_VIDEO.option("base_package")
    store = ModelStore(device=torch.device("cpu"))
    assert store.resolve(ModelSpec(base, "sd15", package=base)).location == str(v2)
    assert microworld.packaged_motion_folder() == str(motion)
    monkeypatch.setattr(microworld, "WEIGHTS_V2", tmp_path / "missing")  # v3 alone cannot carry the v2 adapter
    assert microworld.packaged_motion_folder() is None and not PACKAGED_INSTALLED[base]()
    assert PACKAGED_RESOLVERS["microworld"]() == str(v3)


def test_the_served_loader_imports_the_readout_module_a_fresh_process_lacks(tmp_path):
    folder = tiny_words_folder(tmp_path / "v3")
    script = f"""
import sys, torch
from pipelines.models import ModelSpec, ModelStore
from pipelines.diffusion.models import load_image_model
assert "pipelines.microworld.word_readout" not in sys.modules
store = ModelStore(device=torch.device("cpu"), dtype=torch.float32)
loaded = load_image_model(store.resolve(ModelSpec("v3", "sd15", hub_id={str(folder)!r})), store)
print(type(loaded.pipe.text_encoder).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "WordReadoutCLIPTextModel"
