"""The text tab's A/B endpoint and coloured runs, used the way the UI and API clients use them."""
from __future__ import annotations

from components.text_tab import runs_html, stop_lines


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
