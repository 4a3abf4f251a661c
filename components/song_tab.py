"""Song tab UI: tagged lyrics + style in, a streamed song, stems and stats out. API: /generate_song."""
from __future__ import annotations

from typing import Iterator

import gradio as gr

from pipelines.base import Partial, Progress, Result
from pipelines.song import EXAMPLE_LYRICS, MAX_DURATION_S, MODE_LABELS, SongPipeline, SongRequest

from .common import (GPU_LANE, RANDOM_WEIGHTS_NOTE, clear_on_start, link_seed_reuse, number, on_gpu, run_pipeline,
                     seed_row, stats_panel, wire_stop)

EXAMPLES = [
    [EXAMPLE_LYRICS, "gentle acoustic folk, fingerpicked guitar, warm, 90 bpm"],
    ["[verse]\nNeon rain on an empty street\nCity humming a steady beat\n\n[chorus]\nWe run, we run\n"
     "Chasing the midnight sun\n", "synthwave, driving bass, retro drums, 110 bpm"],
]


def build(pipeline: SongPipeline) -> None:
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    with gr.Row():
        with gr.Column(scale=2):
            lyrics = gr.Textbox(label="Lyrics ([verse], [chorus], [bridge], [intro], [outro] … one tag per line)",
                                value=EXAMPLE_LYRICS, lines=14, elem_id="song-lyrics")
            style = gr.Textbox(label="Style", placeholder="genre, instruments, mood, tempo",
                               value="gentle acoustic folk, fingerpicked guitar, warm, 90 bpm", elem_id="song-style")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="song-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="song-stop")
            live = gr.Audio(label="Live (streamed while decoding)", streaming=True, autoplay=True,
                            interactive=False, elem_id="song-live")
            final = gr.Audio(label="Song (mix)", type="filepath", interactive=False, elem_id="song-final")
            stems = gr.File(label="Download: mix, vocal stem, accompaniment stem", file_count="multiple",
                            interactive=False, elem_id="song-stems")
        with gr.Column(scale=1):
            mode = gr.Radio([(label, key) for key, label in MODE_LABELS.items()], value="dual", label="Mode")
            duration = gr.Slider(1, MAX_DURATION_S["mixed"], value=10, step=1, label="Duration (s)",
                                 info=f"Dual-track: at most {int(MAX_DURATION_S['dual'])} s (MusicGen's limit)")
            draft = gr.Checkbox(value=True, label="Lossless column drafting (dual-track)",
                                info="Prompt lookup over codebook columns, verified: same audio, fewer forwards")
            seed = seed_row()
            with gr.Accordion("Sampling", open=False):
                guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="Guidance scale (CFG)")
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)")
                top_k = gr.Slider(0, 1000, value=250, step=1, label="Top-k (MusicGen)")
                steps = gr.Slider(1, 60, value=8, step=1, label="Diffusion steps (mixed mode)")
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[lyrics, style])

    @on_gpu
    def generate_song(lyrics_text, style_text, duration_s, mode_name, draft_on, guidance_scale, temp, top_k_value,
                      steps_value, seed_value, request: gr.Request) -> Iterator[tuple]:
        song_request = SongRequest(
            lyrics=lyrics_text or "", style=style_text or "", duration_s=number(duration_s, 10.0),
            mode=mode_name or "dual", draft=bool(draft_on), guidance_scale=number(guidance_scale, 3.0),
            temperature=number(temp, 1.0), top_k=int(number(top_k_value, 250)), steps=int(number(steps_value, 8)),
            seed=int(number(seed_value, -1)),
        )
        for event in run_pipeline(pipeline, song_request, request):
            if isinstance(event, Partial):
                yield event.value, gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Progress):  # one per model step: Gradio's own cancel closes the job at a yield
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            elif isinstance(event, Result):
                yield None, event.value["mix"], list(event.value.values()), event.stats  # None ends the stream

    inputs = [lyrics, style, duration, mode, draft, guidance, temperature, top_k, steps, seed]
    clear_on_start([generate.click], [final, stems, stats])
    event = generate.click(generate_song, inputs=inputs, outputs=[live, final, stems, stats],
                           api_name="generate_song", **GPU_LANE)
    wire_stop(stop, "song", [event], stats)
    link_seed_reuse(seed, stats)
