"""Text tab UI: prompt in, streamed text and decoding stats out, tokens coloured by the forward that
accepted them, and a Compare mode (vanilla vs the chosen method on the same prompt and seed).
API: /generate_text (prompt, system, model, method, max_new_tokens, temperature, top_p, seed, top_k,
repetition_penalty, stop_strings -> text, stats) and /compare_text (the first 8, draft model, then the 3 controls
-> vanilla text, method text, comparison)."""
from __future__ import annotations

import html
from typing import Iterator

import gradio as gr

from pipelines.base import Partial, Result, resolve_seed
from pipelines.text import MAX_NEW_TOKENS_LIMIT, METHOD_LABELS, METHODS, TextPipeline, TextRequest, compare_stats

from .common import GPU_LANE, RANDOM_WEIGHTS_NOTE, link_seed_reuse, number, on_gpu, run_pipeline, seed_row, stats_panel, stop_session

EXAMPLES = [
    ["Explain in three sentences why the sky is blue."],
    ["Write a Python function that returns the n-th Fibonacci number."],
    ["Translate to French: The cat sleeps on the warm windowsill."],
]
# One colour per forward that accepted drafted tokens (cycled); single-token steps stay uncoloured.
RUN_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa")
LEGEND = ("<div class='tw-legend'>Coloured spans: tokens committed by one forward that accepted drafted "
          "tokens (hover for the step). Plain text: one token per forward.</div>")


def runs_html(runs: list[list[str]]) -> str:
    """Accepted runs as HTML: each multi-token run one coloured span, titled with its step and length."""
    parts, coloured = [LEGEND, "<div class='tw-runs' style='white-space: pre-wrap'>"], 0
    for step, run in enumerate(runs, start=1):
        text = html.escape("".join(run))
        if len(run) > 1:
            colour = RUN_COLOURS[coloured % len(RUN_COLOURS)]
            coloured += 1
            parts.append(f"<span style='background:{colour}' title='forward {step}: {len(run)} tokens'>{text}</span>")
        else:
            parts.append(text)
    parts.append("</div>")
    return "".join(parts)


def plain_html(text: str) -> str:
    return f"<div style='white-space: pre-wrap'>{html.escape(text)}</div>"


def stop_lines(text: str | None) -> list[str]:
    """Stop strings as typed: one per line, ``\\n`` and ``\\t`` standing for a newline and a tab."""
    lines = (text or "").splitlines()
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in lines if line]


def build(pipeline: TextPipeline) -> None:
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Ask anything…", elem_id="text-prompt")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="text-generate")
                compare = gr.Button("Compare with vanilla", elem_id="text-compare")
                stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
            output = gr.Textbox(label="Output", lines=12, interactive=False, elem_id="text-output")
            coloured = gr.HTML(label="Accepted runs", elem_id="text-runs")
            with gr.Row():
                vanilla_view = gr.HTML(label="Vanilla", elem_id="text-compare-vanilla")
                method_view = gr.HTML(label="Method", elem_id="text-compare-method")
            comparison = stats_panel("Comparison")
        with gr.Column(scale=1):
            model = gr.Dropdown(pipeline.model_choices(), value=pipeline.default_model_name(), label="Model",
                                allow_custom_value=True, info="A listed model, a Hub id or a local folder")
            method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value="merged", label="Decoding method",
                                 info="All methods are lossless: greedy output is identical to vanilla")
            draft_model = gr.Dropdown([""] + pipeline.model_choices(), value="", label="Draft model",
                                      allow_custom_value=True, visible=False,
                                      info="Same tokenizer as the model; empty = the default pair")
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=128, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)")
            stop_strings = gr.Textbox("", label="Stop strings", lines=2, placeholder="One per line; \\n is a newline",
                                      info="The output ends where one of them appears")
            seed = seed_row()
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(label="System prompt", lines=2)
            stats = stats_panel()
    gr.Examples(EXAMPLES, inputs=[prompt])
    method.change(lambda m: gr.update(visible=m == "draft_model"), inputs=method, outputs=draft_model,
                  api_visibility="private")

    def make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                     draft_name="", top_k_value=0, penalty=1.0, stops="") -> TextRequest:
        return TextRequest(
            prompt=prompt_text, system=system_text or "", model=model_name or "", method=method_name or "vanilla",
            max_new_tokens=int(number(max_tokens, 128)), temperature=number(temp, 0.0),
            top_p=number(top_p_value, 1.0), seed=int(number(seed_value, -1)), draft_model=draft_name or "",
            top_k=int(number(top_k_value, 0)), repetition_penalty=number(penalty, 1.0),
            stop_strings=stop_lines(stops),
        )

    def stream(text_request: TextRequest, request: gr.Request) -> Iterator[tuple[str, Result | None]]:
        for event in run_pipeline(pipeline, text_request, request):
            if isinstance(event, Partial):
                yield event.value, None
            elif isinstance(event, Result):
                yield event.value, event

    @on_gpu
    def generate_text(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                      top_k_value, penalty, stops, request: gr.Request) -> Iterator[tuple[str, dict]]:
        text_request = make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp,
                                    top_p_value, seed_value, "", top_k_value, penalty, stops)
        for text, done in stream(text_request, request):
            yield text, done.stats if done else {}

    @on_gpu
    def generate_coloured(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value,
                          seed_value, draft_name, top_k_value, penalty, stops,
                          request: gr.Request) -> Iterator[tuple[str, dict, str]]:
        text_request = make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp,
                                    top_p_value, seed_value, draft_name, top_k_value, penalty, stops)
        for text, done in stream(text_request, request):
            yield text, done.stats if done else {}, runs_html(done.metadata["runs"]) if done else plain_html(text)

    @on_gpu
    def compare_text(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                     draft_name, top_k_value, penalty, stops, request: gr.Request) -> Iterator[tuple[str, str, dict]]:
        shared_seed = resolve_seed(int(number(seed_value, -1)))  # both runs must sample with the same seed
        results: dict[str, Result] = {}
        views = {"vanilla": "", "method": ""}
        for side, name in (("vanilla", "vanilla"), ("method", method_name or "vanilla")):
            text_request = make_request(prompt_text, system_text, model_name, name, max_tokens, temp, top_p_value,
                                        shared_seed, draft_name, top_k_value, penalty, stops)
            for text, done in stream(text_request, request):
                views[side] = runs_html(done.metadata["runs"]) if done else plain_html(text)
                if done:
                    results[side] = done
                yield views["vanilla"], views["method"], {}
        yield views["vanilla"], views["method"], compare_stats(results["vanilla"], results["method"])

    inputs = [prompt, system, model, method, max_new_tokens, temperature, top_p, seed]
    controls = [top_k, repetition_penalty, stop_strings]  # last in every endpoint, so older clients' calls still fit
    # The API keeps its original shape (8 inputs, then the optional controls -> text, stats) on a hidden trigger;
    # the buttons add the draft model and the coloured view.
    api_trigger = gr.Button(visible=False)
    api_event = api_trigger.click(generate_text, inputs=inputs + controls, outputs=[output, stats],
                                  api_name="generate_text", **GPU_LANE)
    button_inputs = inputs + [draft_model] + controls
    event = generate.click(generate_coloured, inputs=button_inputs, outputs=[output, stats, coloured],
                           api_visibility="private", **GPU_LANE)
    submitted = prompt.submit(generate_coloured, inputs=button_inputs, outputs=[output, stats, coloured],
                              api_visibility="private", **GPU_LANE)
    compared = compare.click(compare_text, inputs=button_inputs,
                             outputs=[vanilla_view, method_view, comparison], api_name="compare_text", **GPU_LANE)
    stop.click(stop_session, cancels=[event, submitted, compared, api_event], api_visibility="private")
    link_seed_reuse(seed, stats)
