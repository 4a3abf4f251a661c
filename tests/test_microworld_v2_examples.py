"""The micro-world example picker: re-rendering one example keeps the others' rows, and the committed picks match
the image tab's examples."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "microworld_v2_examples_cpu.json"


@pytest.fixture(scope="module")
def picker():
    return importlib.import_module("benchmarks.microworld_v2_examples")


def test_rerendering_one_example_keeps_the_others_rows_with_their_command(picker):
    examples = [SimpleNamespace(prompt=p) for p in ("a red circle", "a green arrow", "a blue star")]
    old_rows = [{"prompt": "a blue star", "units": [1]}, {"prompt": "a green arrow", "units": [2]},
                {"prompt": "no longer an example", "units": [3]}]
    old = {"command": "old run", "rows": old_rows}
    fresh = [{"prompt": "a green arrow", "units": [4], "command": "new run"}]
    rows = picker.merged_rows(examples, fresh, old)
    assert [r["prompt"] for r in rows] == ["a green arrow", "a blue star"]  # the examples' order, dropped ones gone
    assert rows[0] == fresh[0] and rows[1] == {"command": "old run", "prompt": "a blue star", "units": [1]}


def test_only_needs_the_file_the_other_rows_come_from(picker, tmp_path):
    with pytest.raises(SystemExit):
        picker.main(["--only", "arrow", "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.json").exists()


def test_committed_picks_are_the_image_tabs_examples_and_seeds():
    from components.image_tab import MICROWORLD_EXAMPLES

    rows = {row["prompt"]: row for row in json.loads(RESULTS.read_text())["rows"]}
    controlled = [e for e in MICROWORLD_EXAMPLES if e.binding or e.lpa or e.isolate or e.compass]
    assert set(rows) == {e.prompt for e in controlled}
    for example in controlled:
        assert rows[example.prompt]["example_seed"] == example.seed
        assert [u["seed"] for u in rows[example.prompt]["units"]] == list(range(6))
