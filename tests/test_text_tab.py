"""The text tab: its A/B endpoint, coloured runs, headline, saved results and honest stats, used the way the UI
and API clients use them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.text_tab import compare_headline, result_html, runs_html, slower_reason, stop_lines
from pipelines.base import Partial, PipelineError, Result
from pipelines.decoding.drafters import merged
from pipelines.decoding.drafters.recurrent_drafter import new_head
from pipelines.decoding.compare import compare_stats
from pipelines.decoding.reply import run_texts
from pipelines.tabs.text import TextPipeline, TextRequest

MODEL = "tiny-llama (random weights)"
SPECIAL = 2  # "<|user|>" in the tiny tokenizer: a special token that is not the EOS


@pytest.fixture
def pipeline(store):
    return TextPipeline(store, "tiny")


def run(pipeline, **kwargs) -> Result:
    return pipeline.run(TextRequest(prompt="A red hat and a blue car. A red hat", model=MODEL, seed=3, **kwargs))


def emit_special_after_every_other_token(model):
    """Forward hook: wherever the input token is not the special one, the special token wins the argmax, so greedy
    output alternates a special token with an ordinary one (as a chat model emits <|im_end|> mid-stream)."""
    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None:
            return output
        logits = output.logits
        ids = ids[:, -logits.shape[1]:]
        boost = logits.max(dim=-1).values + 10.0
        logits[..., SPECIAL] = logits[..., SPECIAL].where(ids == SPECIAL, boost)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def test_compare_text_reports_identical_outputs_speedup_and_tau(tiny_client):
    vanilla, method, comparison = tiny_client.predict(
        "A red hat and a blue car. A red hat and a blue", "", "", "prompt_lookup", 20, 0.0, 1.0, 4, "",
        api_name="/compare_text")
    assert comparison["identical"] is True and comparison["method"] == "prompt_lookup"
    assert comparison["speedup"] > 0 and comparison["tau"] >= 1.0
    assert comparison["vanilla_forwards"] == 20 and comparison["method_forwards"] <= 20
    assert vanilla == method and "<" not in vanilla, "the API returns the plain texts of both runs"
    assert comparison["forward_cost_ratio"] > 0 and comparison["vanilla_ms_per_forward"] > 0


def test_text_ab_runs_inside_the_pipeline_vanilla_first_on_one_seed(pipeline):
    """compare="vanilla": A's text streams first (Partials tagged "A"), then B's; B's Result carries A's."""
    request = TextRequest(prompt="A red hat and a blue car. A red hat", model=MODEL, seed=-1, method="prompt_lookup",
                          max_new_tokens=10, temperature=0.8, compare="vanilla")
    events = list(pipeline.generate(request))
    sides = [event.side for event in events if isinstance(event, Partial)]
    assert sides == sorted(sides, reverse=True) and sides[0] == "A" and sides[-1] == ""
    result = events[-1]
    assert isinstance(result, Result) and result.baseline is not None
    assert result.baseline.stats["method"] == "vanilla" and result.stats["method"] == "prompt_lookup"
    assert result.baseline.stats["seed"] == result.stats["seed"] == request.seed >= 0
    assert result.baseline.metadata["token_ids"] == result.metadata["token_ids"], "lossless, sampled on one seed"
    assert result.stats["compare"] == "vanilla" and result.stats["time_ratio_vs_baseline"] > 0
    assert compare_stats(result.baseline, result)["identical"] is True
    with pytest.raises(PipelineError, match="Unknown comparison"):
        list(pipeline.generate(TextRequest(prompt="hi", model=MODEL, compare="merging off")))


def test_text_endpoints_are_callable_with_only_the_prompt(tiny_client):
    text, stats = tiny_client.predict("hello there", api_name="/generate_text")
    assert stats["tokens"] >= 1 and stats["method"] == "merged"
    vanilla, method, comparison = tiny_client.predict("hello there", api_name="/compare_text")
    assert comparison["identical"] is True and vanilla == method


def test_generate_text_api_accepts_every_method(tiny_client):
    for method in ("merged", "recycling", "lookahead", "draft_model"):
        text, stats = tiny_client.predict("hello there", "", "", method, 6, 0.0, 1.0, 2, api_name="/generate_text")
        assert stats["method"] == method and stats["tokens"] == 6 and stats["forwards"] <= 6


def test_special_tokens_never_reach_the_text_the_runs_or_the_views(pipeline):
    lm = pipeline.load(MODEL)
    handle = emit_special_after_every_other_token(lm.model)
    try:
        vanilla = run(pipeline, method="vanilla", max_new_tokens=12)
        lookup = run(pipeline, method="prompt_lookup", max_new_tokens=12)
    finally:
        handle.remove()
    assert SPECIAL in vanilla.metadata["token_ids"], "the hook makes the model emit the special token"
    for result in (vanilla, lookup):
        page = result_html(result)
        assert "<|user|>" not in result.value and "|user|" not in "".join(result.metadata["runs"])
        assert "user|" not in page, "a special token leaked into the coloured view"
        assert "".join(result.metadata["runs"]) == result.value, "the runs are the shown text, cut per forward"


def test_run_texts_cut_the_shown_text_and_keep_split_characters_whole():
    # a character split across two tokens decodes as U+FFFD until its second token arrives
    assert run_texts("ab😀c", [1, 3, 3, 5]) == ["a", "b😀", "", "c"]
    assert run_texts("abc", [2, 1, 9]) == ["ab", "", "c"]
    assert "".join(run_texts("x y z", [1, 4])) == "x y z"


def test_runs_html_colours_multi_token_runs_and_escapes_text():
    page = runs_html(["a", "<b>c", "d", "efg"], [1, 2, 1, 3])
    assert page.count("<span") == 2 and "&lt;b&gt;c" in page
    assert "forward 2: 2 tokens" in page and "forward 4: 3 tokens" in page


def test_every_result_is_saved_as_text_with_a_json_sidecar_of_its_parameters(pipeline):
    result = run(pipeline, method="prompt_lookup", max_new_tokens=8, temperature=0.0)
    saved, sidecar = Path(result.metadata["file"]), Path(result.metadata["sidecar"])
    assert saved.suffix == ".txt" and saved.parent.parent.name == "text"
    assert saved.read_text(encoding="utf-8") == result.value
    parameters = json.loads(sidecar.read_text())
    assert parameters["prompt"] == "A red hat and a blue car. A red hat" and parameters["method"] == "prompt_lookup"
    assert parameters["seed"] == 3 and parameters["max_new_tokens"] == 8 and parameters["tokens"] == 8
    again = run(pipeline, **{k: parameters[k] for k in ("method", "max_new_tokens", "temperature", "top_p")})
    assert again.value == saved.read_text(encoding="utf-8"), "the sidecar reproduces the saved text"


def test_stats_say_draft_head_only_when_the_merged_tree_used_it(pipeline, monkeypatch):
    lm = pipeline.load(MODEL)
    lm.state.use(head=new_head(lm.model))
    try:
        assert run(pipeline, method="merged", max_new_tokens=8).stats["draft_head"] is True
        # trees never wide enough for the head's levels (a CPU's cost curve): the head is left out
        monkeypatch.setattr(merged, "FULL_OFFER", 10**6)
        left_out = run(pipeline, method="merged", max_new_tokens=8)
        assert left_out.stats["draft_head"] is False
        assert run(pipeline, method="redrafter", max_new_tokens=8).stats["draft_head"] is True
    finally:
        lm.state.use(head=None)


def test_headline_gives_the_speedup_identity_and_why_a_method_is_slower(pipeline):
    vanilla = run(pipeline, method="vanilla", max_new_tokens=8)
    method = run(pipeline, method="prompt_lookup", max_new_tokens=8)
    comparison = compare_stats(vanilla, method)
    assert comparison["device"] == "cpu"
    headline = compare_headline(comparison)
    assert f"{comparison['speedup']:.2f}× vanilla" in headline and "identical to vanilla" in headline
    slower = {**comparison, "speedup": 0.78, "tau": 1.6, "forward_cost_ratio": 2.1}
    assert "2.10× as long as a vanilla forward" in slower_reason(slower) and "CPU" in slower_reason(slower)
    assert "rarely accepted" in slower_reason({**slower, "tau": 1.02})
    assert slower_reason({**comparison, "speedup": 1.3}) == ""
    assert "differs from vanilla" in compare_headline({**comparison, "identical": False})


def test_generate_text_api_takes_top_k_penalty_and_stop_strings(tiny_client):
    args = ("hello there", "", "", "merged", 16, 0.0, 1.0, 2)
    text, _ = tiny_client.predict(*args, api_name="/generate_text")  # older clients: 8 inputs
    stop = next(text[i:i + 2] for i in range(4, len(text) - 1)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in text[:i + 1])
    stopped, stats = tiny_client.predict(*args, 0, 1.0, f"never\n{stop}", api_name="/generate_text")
    assert stopped.endswith(stop) and text.startswith(stopped)
    assert stats["stopped_by"] == "stop string" and stats["stop_string"] == stop
    hot = tiny_client.predict("hello there", "", "", "merged", 16, 2.0, 1.0, 2, 1, 1.0, "", api_name="/generate_text")
    assert hot[0] == text  # top-k 1 samples the greedy token whatever the temperature
    assert tiny_client.predict(*args, 0, 1.5, "", api_name="/generate_text")[0] != text


def test_stop_lines_split_lines_and_read_escapes():
    assert stop_lines("###\n\\n\\nUser:\n\nEnd\\t") == ["###", "\n\nUser:", "End\t"]
    assert stop_lines(None) == [] and stop_lines("") == []
