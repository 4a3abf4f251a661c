"""Text tab UI: prompt in, streamed text and decoding stats out. API: /generate_text."""
from __future__ import annotations

from typing import Iterator

import gradio as gr

from pipelines.base import Partial, Result
from pipelines.text import MAX_NEW_TOKENS_LIMIT, TextPipeline, TextRequest

from .common import GPU_LANE, RANDOM_WEIGHTS_NOTE, link_seed_reuse, number, on_gpu, run_pipeline, seed_row, stats_panel, stop_session

EXAMPLES = [
    ["Explain in three sentences why the sky is blue."],
    ["Write a Python function that returns the n-th Fibonacci number."],
    ["Translate to French: The cat sleeps on the warm windowsill."],
]


def build(pipeline: TextPipeline) -> None:
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Ask anything…", elem_id="text-prompt")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="text-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
            output = gr.Textbox(label="Output", lines=12, interactive=False, elem_id="text-output")
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=pipeline.default_model_name(), label="Model",
                                allow_custom_value=True, info="A listed model, a Hub id or a local folder")
            method = gr.Dropdown(["vanilla"], value="vanilla", label="Decoding method")
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=128, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            seed = seed_row()
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(label="System prompt", lines=2)
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[prompt])

    @on_gpu
    def generate_text(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                      request: gr.Request) -> Iterator[tuple[str, dict]]:
        text_request = TextRequest(
            prompt=prompt_text, system=system_text or "", model=model_name or "", method=method_name or "vanilla",
            max_new_tokens=int(number(max_tokens, 128)), temperature=number(temp, 0.0),
            top_p=number(top_p_value, 1.0), seed=int(number(seed_value, -1)),
        )
        text = ""
        for event in run_pipeline(pipeline, text_request, request):
            if isinstance(event, Partial):
                text = event.value
                yield text, {}
            elif isinstance(event, Result):
                yield event.value, event.stats

    inputs = [prompt, system, model, method, max_new_tokens, temperature, top_p, seed]
    event = generate.click(generate_text, inputs=inputs, outputs=[output, stats], api_name="generate_text",
                           **GPU_LANE)
    submitted = prompt.submit(generate_text, inputs=inputs, outputs=[output, stats], api_visibility="private",
                              **GPU_LANE)
    stop.click(stop_session, cancels=[event, submitted], api_visibility="private")
    link_seed_reuse(seed, stats)
