"""Exact EnCodec stream seams: reach derived from the decoder's modules, random non-zero codebooks, LSTM state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.audio.codec_stream import EncodecStream
from pipelines.audio.pcm import ChunkSchedule
from pipelines.tiny import tiny_bark, tiny_musicgen


@pytest.fixture(scope="module")
def codecs():
    torch.set_num_threads(1)
    return {"musicgen": (tiny_musicgen(seed=1)[0].audio_encoder, 4, 64),
            "bark": (tiny_bark(seed=2).model.codec_model, 8, 32)}


def one_shot(codec, codes):
    with torch.inference_mode():
        return codec.decoder(codec.quantizer.decode(codes.transpose(0, 1)))[0, 0].numpy()


def streamed(codec, codes, ends, holdback_samples=None):
    stream = EncodecStream(codec)
    if holdback_samples is not None:
        stream.holdback_samples = holdback_samples
    total = codes.shape[-1]
    return np.concatenate([stream.push(codes[..., :end], final=end == total) for end in ends])


def test_reach_is_read_off_the_modules():
    """MusicGen's 32 kHz EnCodec reaches 2402 samples (3.75 frames) ahead; Bark's causal 24 kHz one reaches none."""
    model, _ = tiny_musicgen()
    assert EncodecStream(model.audio_encoder).holdback_samples == 2402
    assert EncodecStream(tiny_bark().model.codec_model).holdback_samples == 0


@pytest.mark.parametrize("name", ["musicgen", "bark"])
def test_derived_tail_is_exactly_where_truncation_changes_the_audio(codecs, name):
    codec, books, size = codecs[name]
    codes = torch.randint(0, size, (1, books, 40), generator=torch.Generator().manual_seed(0))
    full, part = one_shot(codec, codes), one_shot(codec, codes[..., :20])
    boundary = part.size - EncodecStream(codec).holdback_samples
    assert np.abs(part[:boundary] - full[:boundary]).max() < 1e-6
    if boundary < part.size:
        assert np.abs(part[boundary:] - full[boundary:part.size]).max() > 1e-5


@pytest.mark.parametrize("name", ["musicgen", "bark"])
@pytest.mark.parametrize("ends", [ChunkSchedule(first=7, growth=1.5, largest=20).boundaries(90), [8, 9, 10, 50, 90]])
def test_streamed_audio_equals_one_shot_decode(codecs, name, ends):
    codec, books, size = codecs[name]
    codes = torch.randint(0, size, (1, books, 90), generator=torch.Generator().manual_seed(3))
    whole = one_shot(codec, codes)
    audio = streamed(codec, codes, ends)
    assert audio.shape == whole.shape
    assert np.abs(audio - whole).max() < 1e-5


def test_holdback_of_three_frames_breaks_musicgen_seams(codecs):
    codec, books, size = codecs["musicgen"]
    codes = torch.randint(0, size, (1, books, 90), generator=torch.Generator().manual_seed(3))
    audio = streamed(codec, codes, [30, 60, 90], holdback_samples=3 * 640)
    assert np.abs(audio - one_shot(codec, codes)).max() > 1e-4


def test_too_short_first_chunk_waits_for_reflect_padding(codecs):
    """Bark's causal first conv reflects frames 1..6 into the clip's start: fewer than 7 frames play nothing."""
    codec, books, size = codecs["bark"]
    stream = EncodecStream(codec)
    assert stream.need_frames == 7
    assert stream.push(torch.zeros(books, 6, dtype=torch.long)).size == 0


def test_lstm_state_carries_the_whole_past(codecs):
    """A window restarted with a cold LSTM differs from the one-shot decode; the carried state does not."""
    codec, books, size = codecs["bark"]
    codes = torch.randint(0, size, (1, books, 90), generator=torch.Generator().manual_seed(4))
    whole = one_shot(codec, codes)
    cold = one_shot(codec, codes[..., 60:])[:10 * 320]
    assert np.abs(cold - whole[60 * 320:70 * 320]).max() > 1e-5
    assert np.abs(streamed(codec, codes, [60, 90]) - whole).max() < 1e-5
