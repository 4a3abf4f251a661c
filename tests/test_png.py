"""The parallel PNG writer: files any reader opens, pixels and parameters exactly as given."""
import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines import png
from pipelines.outputs import save_png


@pytest.mark.parametrize("mode,shape", [("RGB", (37, 53, 3)), ("RGBA", (64, 31, 4)), ("L", (40, 41))])
def test_png_round_trips_pixels_and_text(mode, shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = png.png_bytes(Image.fromarray(pixels, mode), {"parameters": '{"prompt": "ünïcode ✓ 猫"}'})
    back = Image.open(io.BytesIO(data))
    back.load()
    assert back.mode == mode and np.array_equal(np.asarray(back), pixels)
    assert back.text["parameters"] == '{"prompt": "ünïcode ✓ 猫"}'


def test_parallel_slices_join_into_one_valid_zlib_stream(monkeypatch):
    monkeypatch.setattr(png, "MIN_SLICE_BYTES", 1000)
    monkeypatch.setattr(png, "WORKERS", 4)
    data = np.random.default_rng(1).integers(0, 4, 50_001, dtype=np.uint8)
    stream = png.zlib_stream(data)
    assert zlib.decompress(stream) == data.tobytes()
    assert stream.count(b"\x00\x00\xff\xff") == 3  # sync-flush markers between the slices: it really split


def test_save_png_keeps_the_parameters(tmp_path):
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    path = save_png(image, {"seed": 3, "prompt": "a red hat"}, tmp_path / "x.png")
    assert json.loads(Image.open(path).text["parameters"]) == {"seed": 3, "prompt": "a red hat"}
