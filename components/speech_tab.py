"""Speech tab UI: text in, audio streamed as it is synthesised, then the WAV + sidecar and latency stats.

API: /generate_speech(text, model, speed, temperature, drafting, stream, seed) -> (streamed audio chunks,
final WAV, sidecar JSON, stats).
"""
from __future__ import annotations

from typing import Iterator

import gradio as gr

from pipelines.audio.pcm import wav_bytes
from pipelines.tabs.speech import SpeechPipeline, SpeechRequest

from .common import (link_seed_reuse, number, on_gpu, refresh_availability, run_buttons, run_pipeline, seed_row,
                     stats_panel, tab_notices, tab_outputs, wire_generate)

EXAMPLES = [
    ["Hello! This is Tokenworks speaking. The first sentence plays while the rest is still being made."],
    ["The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."],
    ["Streaming starts with a small chunk, so you hear the voice almost at once. Later chunks grow larger."],
]


def voice_controls(pipeline: SpeechPipeline, name: str | None) -> tuple[dict, dict]:
    """Updates of (speed, Bark accordion) for the picked voice: speed for hibari and Piper (back to 1.0 when
    hidden, since Bark refuses any other speed), the token-AR settings for Bark; both while the name is unknown."""
    kind = pipeline.kind_of(name or "")
    return (gr.update(visible=kind != "bark", **({"value": 1.0} if kind == "bark" else {})),
            gr.update(visible=kind in ("bark", None)))


def build(pipeline: SpeechPipeline) -> None:
    """The speech tab: text, Speak and the audio on the left; the voice and its settings on the right."""
    notice = tab_notices(pipeline)
    default_kind = pipeline.kind_of(pipeline.default_model_name())
    with gr.Row():
        with gr.Column(scale=2):
            text = gr.Textbox(label="Text", lines=4, placeholder="Type what the voice should say…",
                              elem_id="speech-text")
            generate, stop = run_buttons("speech", "Speak")
            player = gr.Audio(label="Live (streamed)", streaming=True, autoplay=True, interactive=False,
                              elem_id="speech-player")
            final = gr.Audio(label="Result (WAV)", type="filepath", interactive=False, elem_id="speech-final")
            sidecar = gr.File(label="Parameters (sidecar JSON)", interactive=False)
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=pipeline.default_model_name(), label="Voice / model",
                                allow_custom_value=True, elem_id="speech-model",
                                info="hibari and Piper run offline on the CPU; Bark takes a Hub id or local folder")
            speed = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed (hibari, Piper)",
                              visible=default_kind != "bark")
            with gr.Accordion("Token AR (Bark)", open=True, visible=default_kind == "bark",
                              elem_id="speech-bark") as bark_settings:
                temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                drafting = gr.Checkbox(value=True, label="Draft-and-verify (lossless prompt lookup)")
                stream = gr.Checkbox(value=True, label="Stream in growing chunks")
            seed = seed_row()
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[text])

    @on_gpu
    def generate_speech(text_value, model_name, speed_value, temperature_value, drafting_value, stream_value,
                        seed_value, request: gr.Request) -> Iterator[tuple]:
        speech_request = SpeechRequest(
            text=text_value, model=model_name or "", speed=number(speed_value, 1.0),
            temperature=number(temperature_value, 0.7), drafting=bool(drafting_value), stream=bool(stream_value),
            seed=int(number(seed_value, -1)),
        )
        # The live player gets each chunk as WAV bytes; the Result's None ends its stream.
        yield from tab_outputs(run_pipeline(pipeline, speech_request, request), 4,
                               lambda done: (None, done.value, done.metadata["sidecar"], done.stats),
                               lambda chunk: wav_bytes(chunk.samples, chunk.sample_rate))

    inputs = [text, model, speed, temperature, drafting, stream, seed]
    outputs = [player, final, sidecar, stats]
    wire_generate("speech", generate, stop, generate_speech, inputs, outputs, [final, sidecar, stats], stats)
    link_seed_reuse(seed, stats)
    model.change(lambda name: voice_controls(pipeline, name), inputs=model, outputs=[speed, bark_settings],
                 api_visibility="private", queue=False)
    refresh_availability(pipeline, notice, generate, {model: pipeline.model_choices})
