"""Bad input on every tab (corpus: tests/data/bad_inputs.json): a clear gr.Error, then the server serves on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quality_support import (
    DATA, FILE_COMPONENTS, JSON_COMPONENTS, NUMERIC_COMPONENTS, assert_clear_error, client_for, decode_special,
    endpoint_params, positional_args, prompt_label, raw_call, registered_tasks, run_job, shared_app, stats_of,
    submit, tab_case,
)

CASES = json.loads((DATA / "bad_inputs.json").read_text())["cases"]
TASKS = registered_tasks()
# Inputs that accept values the corpus says must be refused: defects found by this gate, owned by the tab.
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}


def targets(params: list[dict], target: str) -> list[str]:
    """The labels of the inputs a corpus target names on one tab."""
    if not target.startswith("$"):
        return [p["label"] for p in params if p["label"] == target]
    if target == "$prompt":
        return [prompt_label(params)]
    if target == "$number":
        return [p["label"] for p in params if p["component"] in NUMERIC_COMPONENTS]
    if target == "$dropdown":
        return [p["label"] for p in params if p["component"] == "Dropdown"]
    if target == "$model":
        return [p["label"] for p in params if p["component"] == "Dropdown" and "model" in p["label"].lower()]
    if target == "$json":
        return [p["label"] for p in params if p["component"] in JSON_COMPONENTS or "JSON" in p["label"]]
    if target == "$file":
        return [p["label"] for p in params if p["component"] in FILE_COMPONENTS]
    raise ValueError(f"unknown corpus target {target!r}")


def make_value(value, tmp_path: Path):
    """A corpus value made concrete: special floats, long prompts, a remote-code model folder, a big file."""
    from gradio_client import handle_file

    if isinstance(value, dict) and value.get("remote_code_dir"):
        folder = tmp_path / "needs-remote-code"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["EvilForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"},
        }))
        (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'remote-code-ran')!r}, 'w').close()\n")
        return str(folder)
    if isinstance(value, dict) and "upload_mb" in value:
        big = tmp_path / "oversize.png"
        with open(big, "wb") as handle:
            handle.truncate(int(value["upload_mb"] * 2**20))
        return handle_file(str(big))
    return decode_special(value)


@pytest.fixture(scope="module")
def app():
    return shared_app()


@pytest.fixture(scope="module")
def client(app):
    return client_for(app.url)


@pytest.fixture(scope="module")
def api(client) -> dict:
    return client.view_api(print_info=False, return_format="dict")


def call_bad(app, client, api, task: str, label: str, value, via: str) -> str:
    """Send one bad value; return the error message the client got (fails if the request succeeded)."""
    from gradio_client.exceptions import AppError

    params = endpoint_params(api, task)
    case = tab_case(task, params)
    values = {**case.valid, label: value}
    if via == "raw":
        event, payload = raw_call(app.url, task, positional_args(params, values))
        assert event == "error", f"{label}={value!r} was accepted: {event} {payload}"
        return str(payload or "")
    try:
        outputs = run_job(submit(client, api, task, values), timeout=120)
    except AppError as error:
        return str(error)
    except Exception as error:  # uploads refused before the job starts (e.g. HTTP 413)
        return f"{type(error).__name__}: {error}"
    raise AssertionError(f"{label}={str(value)[:80]!r} was accepted: {str(outputs[-1])[:200]}")


def expanded_cases():
    for task in TASKS:
        for case in CASES:
            if "tabs" not in case or task in case["tabs"]:
                yield pytest.param(task, case, id=f"{task}-{case['id']}")


@pytest.mark.parametrize("task,case", list(expanded_cases()))
def test_bad_input_gets_clear_error_and_next_request_succeeds(app, client, api, tmp_path, task, case):
    params = endpoint_params(api, task)
    labels = targets(params, case["target"])
    if not labels:
        pytest.skip(f"/generate_{task} has no {case['target']} input")
    valid = tab_case(task, params).valid
    known = []
    for label in labels:
        if (task, label) in KNOWN_DEFECTS and case["id"] in ("negative-number", "huge-number"):
            known.append(KNOWN_DEFECTS[task, label])
            continue
        message = call_bad(app, client, api, task, label, make_value(case["value"], tmp_path), case["via"])
        assert_clear_error(message, case["error"])
        assert not (tmp_path / "remote-code-ran").exists(), "a model's own Python code was executed"
    outputs = run_job(submit(client, api, task, valid), timeout=120)
    assert stats_of(outputs), f"the valid request after {case['id']} on {labels} failed"
    if known:
        pytest.xfail("; ".join(known))


def test_json_cases_reach_every_json_input(api):
    """$json reaches each input that takes JSON, whatever its widget: the video shot list is a gr.Code, the image
    compass objects a gr.Textbox."""
    json_inputs = {"video": "Shots (JSON)", "image": "Objects as JSON (what the API takes)"}
    for task, label in json_inputs.items():
        if task in TASKS:
            assert label in targets(endpoint_params(api, task), "$json"), f"{task}: {label!r} gets no bad JSON"


def test_remote_code_model_is_refused_before_loading_on_every_tab(tmp_path):
    """Under the product preset, every tab refuses a local model whose config asks for its own code."""
    from pipelines.base import PipelineError
    from pipelines.models import ModelStore
    from pipelines.registry import build_registry

    folder = make_value({"remote_code_dir": True}, tmp_path)
    store = ModelStore(packaged={})
    for task, pipeline in build_registry("auto", store).items():
        request = pipeline.request_type(seed=1)
        if not hasattr(request, "model"):
            continue  # the tab takes no model choice from the user
        for name, text in (("prompt", "a red hat"), ("lyrics", "la la la"), ("text", "hello"), ("style", "folk")):
            if hasattr(request, name):
                setattr(request, name, text)
        request.model = folder
        with pytest.raises(PipelineError, match="remote code|[Uu]nknown .*Choose one of"):
            pipeline.run(request)
        assert store.loaded_names() == [], f"{task} loaded something from a remote-code repo"
    assert not (tmp_path / "remote-code-ran").exists()


def test_a_30_mb_prompt_is_refused_before_any_tokenizer_runs():
    import time

    from pipelines.base import MAX_TEXT_CHARS, PipelineError, require_text

    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"{MAX_TEXT_CHARS:,}"):
        require_text("x" * 30_000_000)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("chars,expected", [(29_000_000, "413"), (1_900_000, "limit is 20,000")])
def test_a_huge_prompt_through_the_client_is_refused_in_under_a_second(chars, expected):
    """29 MB: over the 2 MB cap on bodies without files, refused before Gradio parses it (413); 1.9 MB: let
    through, refused by the character bound with the limit named."""
    import time

    client = client_for(shared_app().url)
    prompt = "x" * chars
    started = time.monotonic()
    with pytest.raises(Exception, match=expected):
        client.predict(prompt, "", "", "vanilla", 2, 0.0, 1.0, 1, api_name="/generate_text")
    assert time.monotonic() - started < 1.0, f"took {time.monotonic() - started:.1f} s"
