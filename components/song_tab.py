"""Song tab UI: tagged lyrics + style in, a streamed song, stems and stats out. API: /generate_song."""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import gradio as gr

from pipelines.audio.lyrics import EXAMPLE_LYRICS
from pipelines.tabs.song import MAX_DURATION_S, MODE_LABELS, SongPipeline, SongRequest

from .common import (link_seed_reuse, number, on_gpu, refresh_availability, run_buttons, run_pipeline, seed_row,
                     stats_panel, tab_notices, tab_outputs, wire_generate)

EXAMPLES = [
    [EXAMPLE_LYRICS, "gentle acoustic folk, fingerpicked guitar, warm, 90 bpm"],
    ["[verse]\nNeon rain on an empty street\nCity humming a steady beat\n\n[chorus]\nWe run, we run\n"
     "Chasing the midnight sun\n", "synthwave, driving bass, retro drums, 110 bpm"],
    ["[intro]\n[verse]\nSleep now little one\nThe stars are out to play\n[chorus]\nHush now, hush now\n"
     "Dream the night away\n[verse]\nSleep now little one\nThe moon will light your way\n[chorus]\nHush now, hush now\n"
     "Dream the night away\n[outro]\n", "lullaby in D minor, organ"],
]


def duration_info(mode: str) -> str:
    if mode == "offline":
        return "Not used in this mode: a micro-song lasts as long as its lyrics take at its tempo"
    return f"At most {int(MAX_DURATION_S[mode])} s in this mode" + (" (MusicGen's limit)" if mode == "dual" else "")


def mode_choices(pipeline: SongPipeline) -> list[tuple[str, str]]:
    """The mode radio's (label, mode) pairs, each mode whose models cannot run here marked as needing a download."""
    usable = pipeline.usable_modes()
    return [(label if key in usable else f"{label} · needs a download", key) for key, label in MODE_LABELS.items()]


def mode_controls(mode: str | None, duration_s: float | None) -> tuple[dict, ...]:
    """Updates for a mode: its model pickers and settings shown, the other modes' hidden, the duration capped.
    Order: accompaniment, vocals, song model, drafting, top-k, diffusion steps, note model, duration."""
    mode = mode if mode in MAX_DURATION_S else "dual"
    dual, mixed, offline, limit = mode == "dual", mode == "mixed", mode == "offline", MAX_DURATION_S[mode]
    return (*(gr.update(visible=dual) for _ in range(2)), gr.update(visible=mixed), gr.update(visible=not mixed),
            gr.update(visible=dual), gr.update(visible=mixed), gr.update(visible=offline),
            gr.update(maximum=limit, value=min(number(duration_s, 10.0), limit), info=duration_info(mode)))


def model_pickers(pipeline: SongPipeline, start_mode: str) -> dict[str, gr.Dropdown]:
    """The model dropdown of each kind (accompaniment, vocals, song, note model), shown in the modes that use it."""
    dual, mixed = start_mode == "dual", start_mode == "mixed"
    return {
        "musicgen": gr.Dropdown(pipeline.model_choices("musicgen"), label="Accompaniment model",
                                value=pipeline.default_model_name("musicgen"), visible=dual,
                                elem_id="song-accompaniment-model"),
        "bark": gr.Dropdown(pipeline.model_choices("bark"), value=pipeline.default_model_name("bark"),
                            label="Vocals model", visible=dual, elem_id="song-vocals-model"),
        "ace-step": gr.Dropdown(pipeline.model_choices("ace-step"), value=pipeline.default_model_name("ace-step"),
                                label="Song model (mixed mode)", visible=mixed, elem_id="song-song-model"),
        "microsong": gr.Dropdown(pipeline.model_choices("microsong"), label="Note model (micro-song mode)",
                                 value=pipeline.default_model_name("microsong"), visible=start_mode == "offline",
                                 elem_id="song-note-model"),
    }


def song_generator(pipeline: SongPipeline) -> Callable[..., Iterator[tuple]]:
    """/generate_song's handler: the UI's values as a SongRequest; audio chunks streamed live, then the mix, the
    stems and the stats (None ends the live stream)."""

    @on_gpu
    def generate_song(lyrics_text, style_text, duration_s, mode_name, draft_on, guidance_scale, temp, top_k_value,
                      steps_value, seed_value, accompaniment_name, vocals_name, song_model_name, note_model_name,
                      request: gr.Request) -> Iterator[tuple]:
        song_request = SongRequest(
            lyrics=lyrics_text or "", style=style_text or "", duration_s=number(duration_s, 10.0),
            mode=mode_name or "dual", draft=bool(draft_on), guidance_scale=number(guidance_scale, 3.0),
            temperature=number(temp, 1.0), top_k=int(number(top_k_value, 250)), steps=int(number(steps_value, 8)),
            seed=int(number(seed_value, -1)), accompaniment_model=accompaniment_name or "",
            vocal_model=vocals_name or "", song_model=song_model_name or "", note_model=note_model_name or "",
        )
        yield from tab_outputs(run_pipeline(pipeline, song_request, request), 4,
                               lambda done: (None, done.value["mix"], list(done.value.values()), done.stats),
                               lambda chunk: (chunk.sample_rate, chunk.samples))

    return generate_song


def build(pipeline: SongPipeline) -> None:
    """The song tab: lyrics, style and the song on the left; mode, its models and the sampling on the right."""
    notice = tab_notices(pipeline)
    start_mode = next(iter(pipeline.usable_modes()), "dual")
    with gr.Row():
        with gr.Column(scale=2):
            lyrics = gr.Textbox(label="Lyrics ([verse], [chorus], [bridge], [intro], [outro] … one tag per line)",
                                value=EXAMPLE_LYRICS, lines=14, elem_id="song-lyrics")
            style = gr.Textbox(label="Style", placeholder="genre, instruments, mood, tempo",
                               value="gentle acoustic folk, fingerpicked guitar, warm, 90 bpm", elem_id="song-style")
            generate, stop = run_buttons("song")
            live = gr.Audio(label="Live (streamed while decoding)", streaming=True, autoplay=True,
                            interactive=False, elem_id="song-live")
            final = gr.Audio(label="Song (mix)", type="filepath", interactive=False, elem_id="song-final")
            stems = gr.File(label="Download: mix, vocal stem, accompaniment stem", file_count="multiple",
                            interactive=False, elem_id="song-stems")
        with gr.Column(scale=1):
            mode = gr.Radio(mode_choices(pipeline), value=start_mode, label="Mode", elem_id="song-mode")
            pickers = model_pickers(pipeline, start_mode)
            # Built with the largest limit of any mode: an API call (which never sees a mode change) may ask for
            # a long mixed-mode song; the pipeline refuses too long a dual-track one with a clear error.
            duration = gr.Slider(1, max(MAX_DURATION_S.values()), value=10, step=1, label="Duration (s)",
                                 info=duration_info(start_mode))
            draft = gr.Checkbox(value=True, label="Lossless drafting (dual-track, micro-song)",
                                visible=start_mode != "mixed",
                                info="Prompt lookup over codebook columns (dual) or notes (micro-song), verified: "
                                     "same song, fewer forwards")
            seed = seed_row()
            with gr.Accordion("Sampling", open=False):
                guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="Guidance scale (CFG)")
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)")
                top_k = gr.Slider(0, 1000, value=250, step=1, label="Top-k (MusicGen)", visible=start_mode == "dual")
                steps = gr.Slider(1, 60, value=8, step=1, label="Diffusion steps (mixed mode)",
                                  visible=start_mode == "mixed")
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[lyrics, style])
    inputs = [lyrics, style, duration, mode, draft, guidance, temperature, top_k, steps, seed, *pickers.values()]
    wire_generate("song", generate, stop, song_generator(pipeline), inputs, [live, final, stems, stats],
                  [final, stems, stats], stats)
    link_seed_reuse(seed, stats)
    accompaniment, vocals, song_model, note_model = pickers.values()
    mode.change(mode_controls, inputs=[mode, duration],
                outputs=[accompaniment, vocals, song_model, draft, top_k, steps, note_model, duration],
                api_visibility="private", queue=False)
    refresh_availability(pipeline, notice, generate, {**{picker: partial(pipeline.model_choices, kind)
                                                         for kind, picker in pickers.items()},
                                                      mode: partial(mode_choices, pipeline)})
