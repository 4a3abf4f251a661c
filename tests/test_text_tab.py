"""The text tab's A/B endpoint and coloured runs, used the way the UI and API clients use them."""
from __future__ import annotations

from components.text_tab import runs_html


def test_compare_text_reports_identical_outputs_speedup_and_tau(tiny_client):
    vanilla, method, comparison = tiny_client.predict(
        "A red hat and a blue car. A red hat and a blue", "", "", "prompt_lookup", 20, 0.0, 1.0, 4, "",
        api_name="/compare_text")
    assert comparison["identical"] is True and comparison["method"] == "prompt_lookup"
    assert comparison["speedup"] > 0 and comparison["tau"] >= 1.0
    assert comparison["vanilla_forwards"] == 20 and comparison["method_forwards"] <= 20
    assert "tw-runs" in vanilla and "tw-runs" in method


def test_generate_text_api_accepts_every_method(tiny_client):
    for method in ("merged", "recycling", "lookahead", "draft_model"):
        text, stats = tiny_client.predict("hello there", "", "", method, 6, 0.0, 1.0, 2, api_name="/generate_text")
        assert stats["method"] == method and stats["tokens"] == 6 and stats["forwards"] <= 6


def test_runs_html_colours_multi_token_runs_and_escapes_text():
    page = runs_html([["a"], ["<b>", "c"], ["d"], ["e", "f", "g"]])
    assert page.count("<span") == 2 and "&lt;b&gt;c" in page
    assert "forward 2: 2 tokens" in page and "forward 4: 3 tokens" in page
