"""The benchmark scripts run end to end on tiny sizes and write the agreed JSON shape."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_cost  # noqa: E402
import text_decoding  # noqa: E402


def test_step_cost_writes_a_curve_for_every_size(tmp_path):
    out = tmp_path / "step.json"
    step_cost.main(["--device", "cpu", "--configs", "tiny", "--context", "16", "--repeats", "1",
                    "--sizes", "1,4,16", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {"benchmark", "device", "model", "settings", "command", "rows"} <= set(data)
    assert [r["query_tokens"] for r in data["rows"]] == [1, 4, 16]
    assert data["rows"][0]["ratio_to_one_token"] == 1.0


def test_text_decoding_rows_compare_against_vanilla_in_the_same_run():
    def record(category, vanilla_tokens, fast_tokens, fast_time):
        return {"category": category,
                "vanilla": {"tokens": vanilla_tokens, "time_s": 2.0, "forwards": len(vanilla_tokens), "draft_s": 0.0,
                            "step_s": 2.0},
                "pld": {"tokens": fast_tokens, "time_s": fast_time, "forwards": 2, "draft_s": 0.1, "step_s": fast_time}}

    rows = text_decoding.summarise([record("math", [1, 2, 3, 4], [1, 2, 3, 4], 1.0),
                                    record("qa", [5, 6, 7, 8], [5, 6, 7, 9], 2.0)], ["vanilla", "pld"])
    overall = {r["method"]: r for r in rows if r["category"] == "all"}
    assert overall["vanilla"]["speedup"] == 1.0 and overall["pld"]["speedup"] == 1.5
    assert overall["pld"]["tau"] == 2.0 and overall["pld"]["identical_fraction"] == 0.5
    math = next(r for r in rows if r["category"] == "math" and r["method"] == "pld")
    assert math["speedup"] == 2.0 and math["identical_fraction"] == 1.0


def test_prompt_file_has_39_prompts_over_12_categories():
    rows = text_decoding.read_prompts(str(Path(__file__).resolve().parents[1] / "benchmarks/prompts/mixed39.jsonl"))
    assert len(rows) == 39 and len({r["category"] for r in rows}) == 12


def test_text_served_drives_the_tab_and_checks_identity_against_our_plain_path(tmp_path):
    import text_served

    out = tmp_path / "served.json"
    text_served.main(["--tiny", "--limit", "2", "--max-new-tokens", "6", "--methods", "vanilla,prompt_lookup",
                      "--anchors", "hf-eager", "--exact", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {(r["method"], r["category"]): r for r in report["rows"]}
    assert report["recompile_reasons_after_warmup"] == {}  # nothing compiled on the CPU
    assert {"tokens_per_s", "speedup_vs_plain", "tau", "identical_fraction", "recompiles_after_warmup",
            "first_request_s", "draft_share"} <= set(rows["prompt_lookup", "all"])
    # fp32 on the CPU: the lossless method and transformers' greedy generate reproduce our plain path exactly
    assert rows["prompt_lookup", "all"]["identical_fraction"] == 1.0
    assert rows["hf-eager", "all"]["identical_fraction"] == 1.0
    assert rows["vanilla", "all"]["speedup_vs_plain"] == 1.0
    # --exact: each method again in exact mode, compared with exact-mode vanilla
    assert rows["prompt_lookup+exact", "all"]["identical_fraction"] == 1.0
    assert rows["vanilla+exact", "all"]["speedup_vs_plain"] > 0


def test_text_served_runs_the_merged_drafter_without_its_head_as_a_diagnostic_only_for_the_run(tmp_path):
    import text_served
    from pipelines.decoding.methods import DECODING_METHODS

    out = tmp_path / "served.json"
    text_served.main(["--tiny", "--limit", "1", "--max-new-tokens", "6", "--methods", "vanilla,merged-ppd,merged-lean",
                      "--anchors", "", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"] if r["category"] == "all"}
    assert rows["merged-ppd"]["identical_fraction"] == rows["merged-lean"]["identical_fraction"] == 1.0
    assert "merged-ppd" not in DECODING_METHODS and "merged-lean" not in DECODING_METHODS  # the tab never sees them


def test_first_divergence_names_the_first_differing_token():
    import text_served

    assert text_served.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert text_served.first_divergence([1, 5, 3], [1, 2, 3]) == 1
    assert text_served.first_divergence([1, 2], [1, 2, 3]) == 2


def test_long_prompt_benchmark_times_start_drafters_and_the_request(tmp_path):
    import long_prompt

    out = tmp_path / "long.json"
    long_prompt.main(["--prompt-tokens", "600", "--max-new-tokens", "6", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert {"benchmark", "device", "model", "settings", "command", "rows"} <= set(data)
    assert rows["lookahead_trie_start"]["earlier_answer_kept"] is True
    assert {"prompt_lookup", "lookahead", "recycling", "merged"} == {m[:-len("_drafter_costs")] for m in rows
                                                                    if m.endswith("_drafter_costs")}
    for method in ("plain", "merged", "merged_mask_over_prompt"):
        assert rows[method]["identical_to_plain"] is True and rows[method]["wall_s"] > 0
    assert rows["plain"]["ratio_to_plain"] == 1.0


def test_weights_option_serves_a_packaged_entry_from_a_given_folder(tmp_path):
    import text_served
    from pipelines.models import ModelStore
    from pipelines.tabs.text import TextPipeline

    pipeline = TextPipeline(ModelStore())
    name = "SmolLM2-135M-Instruct (packaged)"
    text_served.use_weights(pipeline, name, tmp_path)
    spec = pipeline.spec_for(name)
    assert pipeline.store.packaged[spec.package](spec) == str(tmp_path)
    with pytest.raises(SystemExit):
        text_served.use_weights(pipeline, "Qwen2.5-7B-Instruct", tmp_path)  # not a packaged entry
