"""API contract of every registered tab, through gradio_client against the launched tiny app."""
from __future__ import annotations

import re

import pytest

from quality_support import (
    REPO, SEED_LABEL, fingerprint, is_number, is_update, prompt_label, registered_tasks, run_job, shared_app,
    stats_of, submit, tab_case,
)

TASKS = registered_tasks()


@pytest.fixture(scope="module")
def client():
    from quality_support import client_for

    return client_for(shared_app().url)


@pytest.fixture(scope="module")
def api(client) -> dict:
    return client.view_api(print_info=False, return_format="dict")


def test_every_registered_tab_has_its_generate_endpoint(api):
    named = api["named_endpoints"]
    assert {f"/generate_{task}" for task in TASKS} <= set(named)


@pytest.mark.parametrize("task", TASKS)
def test_endpoint_parameters_are_labelled_typed_and_seeded(api, task):
    endpoint = api["named_endpoints"][f"/generate_{task}"]
    params = endpoint["parameters"]
    for param in params:
        assert param["label"] and param["parameter_name"] and param["component"], param
        assert param["python_type"]["type"], param
    labels = [param["label"] for param in params]
    assert len(labels) == len(set(labels)), f"two inputs share a label: {labels}"
    assert prompt_label(params), f"/generate_{task} has no prompt input: {labels}"
    assert SEED_LABEL in labels, f"/generate_{task} has no seed input: {labels}"
    returns = endpoint["returns"]
    assert len(returns) >= 2, "an endpoint returns its media plus the stats"
    assert returns[-1]["component"] == "Json" and returns[-1]["label"] == "Stats"


@pytest.mark.parametrize("task", TASKS)
def test_valid_request_returns_output_and_flat_numeric_stats(client, api, task):
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    outputs = run_job(submit(client, api, task, case.valid))
    media, stats = outputs[-1][0], stats_of(outputs)
    assert media not in (None, "", [], {}), f"/generate_{task} returned no output"
    assert not any(is_update(value) for value in outputs[-1]), f"a bare update dict in the result: {outputs[-1]}"
    for key in case.numeric_stats:
        assert key in stats, f"stats of /generate_{task} lack {key!r}: {sorted(stats)}"
        assert is_number(stats[key]), f"stats[{key!r}] = {stats[key]!r} is not a finite number"
    assert all(isinstance(v, (int, float, str, bool)) for v in stats.values()), f"stats are not flat: {stats}"
    assert any(key.endswith("_s") and is_number(value) for key, value in stats.items()), "no timing in stats"
    if SEED_LABEL in case.valid:
        assert stats["seed"] == case.valid[SEED_LABEL], "the stats report the seed that was used"


@pytest.mark.parametrize("task", TASKS)
def test_streamed_outputs_arrive_in_order_and_end_with_the_result(client, api, task):
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    outputs = run_job(submit(client, api, task, case.valid))
    assert outputs, "no output streamed"
    finals = [index for index, output in enumerate(outputs) if output[-1]]
    assert finals and finals[-1] == len(outputs) - 1, "stats arrive with the last output"
    if case.stream == "prefix":
        texts = [output[0] for output in outputs]
        assert len(texts) >= 2, "text streams more than one update"
        for earlier, later in zip(texts, texts[1:]):
            assert later.startswith(earlier), f"streamed text went backwards: {earlier!r} -> {later!r}"


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_reproduces_and_stats_report_it(client, api, task):
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    first = run_job(submit(client, api, task, {**case.valid, **case.sampled, SEED_LABEL: 1234}))
    again = run_job(submit(client, api, task, {**case.valid, **case.sampled, SEED_LABEL: 1234}))
    random_seed = run_job(submit(client, api, task, {**case.valid, **case.sampled, SEED_LABEL: -1}))
    assert fingerprint(first[-1][:-1]) == fingerprint(again[-1][:-1])
    assert stats_of(first)["seed"] == 1234
    assert 0 <= stats_of(random_seed)["seed"] and stats_of(random_seed)["seed"] != -1, "-1 resolves to a seed"


@pytest.mark.parametrize("endpoint", ["/generate_text", "/compare_text", "/generate_image", "/generate_video",
                                      "/generate_speech", "/generate_song"])
def test_every_endpoint_needs_only_its_prompt(api, endpoint):
    params = api["named_endpoints"][endpoint]["parameters"]
    required = [param["label"] for param in params if not param["parameter_has_default"]]
    assert required in ([], [prompt_label(params)]), f"{endpoint} requires {required}: give them defaults"


def readme_api_examples() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_readme_has_one_api_example_per_tab():
    examples = "\n".join(readme_api_examples())
    for task in TASKS:
        assert f'api_name="/generate_{task}"' in examples, f"the README's API section has no example for {task}"


def test_readme_api_examples_run_against_the_tiny_app(capsys):
    namespace: dict = {}
    blocks = readme_api_examples()
    exec(blocks[0].replace("http://127.0.0.1:7860/", shared_app().url), namespace)  # the client
    for block in blocks[1:]:
        namespace.pop("stats", None)
        exec(block, namespace)
        stats = namespace.get("stats")
        assert isinstance(stats, dict) and stats and "seed" in stats, f"no stats from:\n{block}"
        assert capsys.readouterr().out.strip(), f"the example printed nothing:\n{block}"
