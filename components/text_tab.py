"""Text tab UI: prompt in, one streamed output view (tokens coloured by the forward that accepted them, a toggle),
a headline with the speed and what it means, and Compare (vanilla A vs the chosen method B, same prompt and seed).
API: /generate_text (prompt, system, model, method, max_new_tokens, temperature, top_p, seed, top_k,
repetition_penalty, stop_strings, exact -> text, stats) and /compare_text (the first 8, draft model, then the 4
controls -> vanilla text, method text, comparison)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from pipelines.base import Partial, Result
from pipelines.decoding.compare import compare_stats
from pipelines.decoding.methods import DECODING_METHODS, METHOD_LABELS, METHODS
from pipelines.tabs.text import MAX_NEW_TOKENS_LIMIT, TextPipeline, TextRequest

from .common import (CANCELS, GPU_LANE, RANDOM_WEIGHTS_NOTE, link_seed_reuse, number, on_gpu, run_pipeline, seed_row,
                     session_of, stats_panel, wire_stop)

EXAMPLES = [
    ["Explain in three sentences why the sky is blue."],
    ["Write a Python function that returns the n-th Fibonacci number."],
    ["Translate to French: The cat sleeps on the warm windowsill."],
]
# One colour per forward that accepted drafted tokens (cycled); single-token steps stay uncoloured.
RUN_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa")
LEGEND = ("<div class='tw-legend'>Coloured spans: tokens committed by one forward that accepted drafted "
          "tokens (hover for the step). Plain text: one token per forward.</div>")
COLOURED, PLAIN = ["tw-text", "tw-coloured"], ["tw-text"]
VANILLA_HEADING = "#### A · Vanilla (one token per forward)"
METHOD_INFO = ("Greedy output equals vanilla in exact mode, and in fp32 on the CPU in every test; in bf16 on a GPU "
               "near-ties can flip a token: Compare shows where")
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
EXACT_LABEL = ("Exact mode: greedy output of every method bit-identical to vanilla in this mode (slower: "
               "fixed-shape forwards)")


def runs_html(runs: list[str], sizes: list[int]) -> str:
    """Accepted runs as HTML: each multi-token run one span (coloured unless the view is plain), titled with
    its step and length; ``runs`` are the texts of the forwards, ``sizes`` their token counts."""
    parts, coloured = [LEGEND, "<div class='tw-runs'>"], 0
    for step, (run, size) in enumerate(zip(runs, sizes), start=1):
        text = html.escape(run)
        if size > 1:
            colour = RUN_COLOURS[coloured % len(RUN_COLOURS)]
            coloured += 1
            parts.append(f"<span class='tw-run' style='--tw-run: {colour}' "
                         f"title='forward {step}: {size} tokens'>{text}</span>")
        else:
            parts.append(text)
    parts.append("</div>")
    return "".join(parts)


def result_html(result: Result) -> str:
    return runs_html(result.metadata["runs"], [len(run) for run in result.metadata["run_ids"]])


def plain_html(text: str) -> str:
    return f"<div class='tw-runs'>{html.escape(text)}</div>"


def run_headline(result: Result) -> str:
    stats = result.stats
    return (f"**{short_label(stats['method'])}**: {stats['tokens']} tokens in {stats['time_s']:.2f} s, "
            f"**{stats['tokens_per_s']:.1f} tokens/s**, τ {stats['tau']:.2f} tokens per forward "
            f"({stats['forwards']} forwards). Saved to `{result.metadata['file']}` with its parameters "
            f"(`.json` next to it).")


def compare_headline(comparison: dict[str, Any]) -> str:
    """The A/B verdict: the speed-up, whether B reproduced A's tokens, and why B is slower when it is."""
    label = short_label(comparison["method"])
    verdict = (f"**{label}: {comparison['speedup']:.2f}× vanilla** ({comparison['method_tokens_per_s']:.1f} vs "
               f"{comparison['vanilla_tokens_per_s']:.1f} tokens/s, τ {comparison['tau']:.2f} tokens per forward). ")
    if comparison["identical"]:
        verdict += "**Output identical to vanilla** ✓" + (" (exact mode)" if comparison.get("exact") else "")
    else:
        verdict += "**Output differs from vanilla** ✗: " + divergence_text(comparison)
    reason = slower_reason(comparison)
    return verdict + (f"\n\n{reason}" if reason else "")


def divergence_text(comparison: dict[str, Any]) -> str:
    """Where the method's tokens left vanilla's, with both runs' logits, and the cause when it is a near-tie."""
    found = comparison.get("divergence")
    if not found:
        return "one run stopped before the other."
    where = (f"diverged at token {found['index']}: plain chose {found['plain_text']!r} "
             f"(logit {_logit(found['plain_logit'])}), method chose {found['method_text']!r} "
             f"(logit {_logit(found['method_logit'])})")
    if found["near_tie"]:
        dtype = comparison.get("dtype") or ""
        return where + f" — {DTYPE_NAMES.get(dtype, dtype or 'low-precision')} rounding at a near-tie."
    return where + " — not a rounding near-tie (sampling drew differently, or the method is not lossless here)."


def _logit(value: float | None) -> str:
    return "outside its top 2" if value is None else f"{value:.4g}"


def short_label(method: str) -> str:
    return DECODING_METHODS[method].short if method in DECODING_METHODS else method


def slower_reason(comparison: dict[str, Any]) -> str:
    """Why B did not beat A here, from the measured numbers; "" when it did."""
    if comparison["speedup"] >= 1.0 or comparison["method"] == "vanilla":
        return ""
    device = "CPU" if comparison.get("device") == "cpu" else "device"
    tau, cost = comparison["tau"], comparison["forward_cost_ratio"]
    if tau < 1.1:
        return (f"Why slower here: the drafts were rarely accepted on this prompt (τ {tau:.2f}), so the method paid "
                "for drafting and verifying and committed about one token per forward, as vanilla does.")
    return (f"Why slower here: each of its forwards committed τ {tau:.2f} tokens but took {cost:.2f}× as long as a "
            f"vanilla forward. On this {device} verifying the draft tree costs more than the tokens it saves; on a "
            "GPU a forward over a small tree costs about as much as one token, which is where the method pays.")


def stop_lines(text: str | None) -> list[str]:
    """Stop strings as typed: one per line, ``\\n`` and ``\\t`` standing for a newline and a tab."""
    lines = (text or "").splitlines()
    return [line.replace("\\n", "\n").replace("\\t", "\t") for line in lines if line]


@dataclass
class TextOutputs:
    """What a run shows under the buttons (headline, coloured view, saved files, the A/B panel) and the API's plain
    texts, hidden."""

    headline: gr.Markdown
    view: gr.HTML
    colour: gr.Checkbox
    output: gr.Textbox
    saved: gr.File
    ab_panel: gr.Column
    vanilla_view: gr.HTML
    method_heading: gr.Markdown
    method_view: gr.HTML
    comparison: gr.JSON
    vanilla_text: gr.Textbox
    method_text: gr.Textbox


def text_outputs() -> TextOutputs:
    """The output view with its colour toggle, the saved files and the A/B panel (hidden until Compare)."""
    headline = gr.Markdown(elem_id="text-headline")
    view = gr.HTML(label="Output", elem_id="text-view", elem_classes=COLOURED, min_height=120)
    colour = gr.Checkbox(value=True, label="Colour the tokens each forward accepted", elem_id="text-colour")
    output = gr.Textbox(label="Output", visible=False, elem_id="text-output")  # the API's plain text
    saved = gr.File(label="Saved: the text and its parameters (JSON)", file_count="multiple",
                    interactive=False, visible=False, elem_id="text-saved")
    with gr.Column(visible=False, elem_id="text-ab") as ab_panel:
        with gr.Row():
            with gr.Column():
                gr.Markdown(VANILLA_HEADING)
                vanilla_view = gr.HTML(elem_id="text-compare-vanilla", elem_classes=COLOURED)
            with gr.Column():
                method_heading = gr.Markdown("#### B · Method", elem_id="text-compare-heading")
                method_view = gr.HTML(elem_id="text-compare-method", elem_classes=COLOURED)
        comparison = stats_panel("Comparison")
    vanilla_text = gr.Textbox(label="Vanilla", visible=False)  # the API's plain texts of the A/B
    method_text = gr.Textbox(label="Method", visible=False)
    return TextOutputs(headline, view, colour, output, saved, ab_panel, vanilla_view, method_heading, method_view,
                       comparison, vanilla_text, method_text)


@dataclass
class TextSettings:
    """The right column's widgets: model, decoding method, sampling, seed, system prompt and the stats."""

    model: gr.Dropdown
    method: gr.Dropdown
    exact: gr.Checkbox
    draft_model: gr.Dropdown
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    stop_strings: gr.Textbox
    seed: gr.Number
    system: gr.Textbox
    stats: gr.JSON

    def inputs(self, prompt: gr.Textbox, draft: bool) -> list:
        """An endpoint's inputs: prompt and sampling, the draft model where it takes one, then the controls last in
        every endpoint, so older clients' calls still fit."""
        return [prompt, self.system, self.model, self.method, self.max_new_tokens, self.temperature, self.top_p,
                self.seed, *([self.draft_model] if draft else []), self.top_k, self.repetition_penalty,
                self.stop_strings, self.exact]


def text_settings(pipeline: TextPipeline) -> TextSettings:
    """Model and decoding method (the draft model shown only for draft-model decoding), then the sampling."""
    model = gr.Dropdown(pipeline.model_choices(), value=pipeline.default_model_name(), label="Model",
                        allow_custom_value=True, info="A listed model, a Hub id or a local folder")
    method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value="merged", label="Decoding method",
                         info=METHOD_INFO)
    exact = gr.Checkbox(value=False, label=EXACT_LABEL, elem_id="text-exact")
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
    return TextSettings(model, method, exact, draft_model, max_new_tokens, temperature, top_p, top_k,
                        repetition_penalty, stop_strings, seed, system, stats_panel())


def make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                 draft_name="", top_k_value=0, penalty=1.0, stops="", exact_mode=False) -> TextRequest:
    """The UI's values as a TextRequest; an emptied box takes the request's default."""
    return TextRequest(
        prompt=prompt_text, system=system_text or "", model=model_name or "", method=method_name or "vanilla",
        max_new_tokens=int(number(max_tokens, 128)), temperature=number(temp, 0.0),
        top_p=number(top_p_value, 1.0), seed=int(number(seed_value, -1)), draft_model=draft_name or "",
        top_k=int(number(top_k_value, 0)), repetition_penalty=number(penalty, 1.0),
        stop_strings=stop_lines(stops), exact=bool(exact_mode),
    )


def generate_handlers(pipeline: TextPipeline) -> tuple[Callable[..., Iterator[tuple]], Callable[..., Iterator[tuple]]]:
    """/generate_text's handler (the text and stats) and Generate's (the coloured view, stats, headline and the
    saved files too)."""

    def stream(text_request: TextRequest, request: gr.Request) -> Iterator[tuple[str, Result | None]]:
        for event in run_pipeline(pipeline, text_request, request):
            if isinstance(event, Partial):
                yield event.value, None
            elif isinstance(event, Result):
                yield event.value, event

    @on_gpu
    def generate_text(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                      top_k_value, penalty, stops, exact_mode, request: gr.Request) -> Iterator[tuple[str, Any]]:
        text_request = make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp,
                                    top_p_value, seed_value, "", top_k_value, penalty, stops, exact_mode)
        for text, done in stream(text_request, request):
            yield text, done.stats if done else {}

    @on_gpu
    def generate_in_view(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value,
                         seed_value, draft_name, top_k_value, penalty, stops, exact_mode,
                         request: gr.Request) -> Iterator[tuple]:
        text_request = make_request(prompt_text, system_text, model_name, method_name, max_tokens, temp,
                                    top_p_value, seed_value, draft_name, top_k_value, penalty, stops, exact_mode)
        for text, done in stream(text_request, request):
            if done is None:
                yield text, plain_html(text), gr.skip(), gr.skip(), gr.skip()
            else:
                files = [done.metadata["file"], done.metadata["sidecar"]]
                yield text, result_html(done), done.stats, run_headline(done), gr.update(value=files, visible=True)

    return generate_text, generate_in_view


def compare_handlers(pipeline: TextPipeline) -> tuple[Callable[..., Iterator[tuple]], Callable[..., Iterator[tuple]]]:
    """/compare_text's handler (both texts and the comparison) and Compare's (both coloured views, the comparison,
    the verdict and the saved files)."""

    def compare_runs(args: tuple, request: gr.Request) -> Iterator[tuple[dict[str, str], dict[str, Result]]]:
        """The pipeline's same-seed A/B (vanilla, then the method); yields the texts so far and, at the end, both
        runs' Results."""
        text_request = make_request(*args)
        text_request.compare = "vanilla"
        texts, results = {"vanilla": "", "method": ""}, {}
        for event in run_pipeline(pipeline, text_request, request):
            if isinstance(event, Partial):
                texts["vanilla" if event.side == "A" else "method"] = event.value
            elif isinstance(event, Result):
                results = {"vanilla": event.baseline, "method": event}
            else:
                continue
            yield texts, results

    @on_gpu
    def compare_text(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                     draft_name, top_k_value, penalty, stops, exact_mode,
                     request: gr.Request) -> Iterator[tuple[str, str, Any]]:
        args = (prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                draft_name, top_k_value, penalty, stops, exact_mode)
        for texts, results in compare_runs(args, request):
            finished = len(results) == 2
            yield (texts["vanilla"], texts["method"],
                   compare_stats(results["vanilla"], results["method"]) if finished else {})

    @on_gpu
    def compare_in_view(prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                        draft_name, top_k_value, penalty, stops, exact_mode, request: gr.Request) -> Iterator[tuple]:
        args = (prompt_text, system_text, model_name, method_name, max_tokens, temp, top_p_value, seed_value,
                draft_name, top_k_value, penalty, stops, exact_mode)
        for texts, results in compare_runs(args, request):
            views = [result_html(results[side]) if side in results else plain_html(texts[side])
                     for side in ("vanilla", "method")]
            if len(results) < 2:
                yield *views, gr.skip(), gr.skip(), gr.skip()
                continue
            summary = compare_stats(results["vanilla"], results["method"])
            files = [path for run in results.values() for path in (run.metadata["file"], run.metadata["sidecar"])]
            yield *views, summary, compare_headline(summary), gr.update(value=files, visible=True)

    return compare_text, compare_in_view


def clear_for_run(comparing: bool, method_name: str | None = None) -> list:
    """What a new run starts from: no previous output, stats, headline, files or A/B left on screen."""
    label = short_label(method_name or "vanilla")
    note = plain_html(f"Comparing: A (vanilla) and B ({label}) run one after the other, below.")
    note = note if comparing else ""
    return ["", note, {}, "", gr.update(value=None, visible=False), gr.update(visible=comparing), "", "", {},
            f"#### B · {label}"]


def clear_for_generate(request: gr.Request) -> list:
    CANCELS.ask(session_of(request), "text")  # Stop learns a request is queued
    return clear_for_run(False)


def clear_for_compare(method_name: str, request: gr.Request) -> list:
    CANCELS.ask(session_of(request), "text")
    return clear_for_run(True, method_name)


def build(pipeline: TextPipeline) -> None:
    """The text tab: prompt, buttons and the output on the left; model, method and sampling on the right."""
    if pipeline.preset == "tiny":
        gr.Markdown(RANDOM_WEIGHTS_NOTE)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Ask anything…", elem_id="text-prompt")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="text-generate")
                compare = gr.Button("Compare with vanilla", elem_id="text-compare")
                stop = gr.Button("Stop", variant="stop", elem_id="text-stop")
            shown = text_outputs()
        with gr.Column(scale=1):
            settings = text_settings(pipeline)
    gr.Examples(EXAMPLES, inputs=[prompt])
    settings.method.change(lambda m: gr.update(visible=m == "draft_model"), inputs=settings.method,
                           outputs=settings.draft_model, api_visibility="private")
    shown.colour.change(lambda on: [gr.update(elem_classes=COLOURED if on else PLAIN)] * 3, inputs=shown.colour,
                        outputs=[shown.view, shown.vanilla_view, shown.method_view], queue=False,
                        api_visibility="private")
    wire_runs(pipeline, prompt, generate, compare, stop, shown, settings)


def wire_runs(pipeline: TextPipeline, prompt: gr.Textbox, generate: gr.Button, compare: gr.Button, stop: gr.Button,
              shown: TextOutputs, settings: TextSettings) -> None:
    """Generate and Compare, each cleared on click, and Stop reaching every run. The API keeps its plain shapes on
    hidden triggers (text and stats; A/B texts and comparison); the buttons add the draft model, the coloured view,
    the headline and the saved files."""
    generate_text, generate_in_view = generate_handlers(pipeline)
    compare_text, compare_in_view = compare_handlers(pipeline)
    stats, with_draft = settings.stats, settings.inputs(prompt, draft=True)
    cleared = [shown.output, shown.view, stats, shown.headline, shown.saved, shown.ab_panel, shown.vanilla_view,
               shown.method_view, shown.comparison, shown.method_heading]
    api_trigger, api_compare_trigger = gr.Button(visible=False), gr.Button(visible=False)
    api_event = api_trigger.click(generate_text, inputs=settings.inputs(prompt, draft=False),
                                  outputs=[shown.output, stats], api_name="generate_text", **GPU_LANE)
    api_compared = api_compare_trigger.click(compare_text, inputs=with_draft,
                                             outputs=[shown.vanilla_text, shown.method_text, shown.comparison],
                                             api_name="compare_text", **GPU_LANE)
    # each run starts after its clear: a clear answered late (a loaded server) would empty the run's first output
    clearing = gr.on([generate.click, prompt.submit], clear_for_generate, outputs=cleared, queue=False,
                     api_visibility="private")
    clearing_for_compare = compare.click(clear_for_compare, inputs=settings.method, outputs=cleared, queue=False,
                                         api_visibility="private")
    generated = clearing.then(generate_in_view, inputs=with_draft,
                              outputs=[shown.output, shown.view, stats, shown.headline, shown.saved],
                              api_visibility="private", **GPU_LANE)
    compared = clearing_for_compare.then(compare_in_view, inputs=with_draft,
                                         outputs=[shown.vanilla_view, shown.method_view, shown.comparison,
                                                  shown.headline, shown.saved], api_visibility="private", **GPU_LANE)
    wire_stop(stop, "text", [generated, compared, api_event, api_compared], stats, shown.headline)
    link_seed_reuse(settings.seed, stats)
