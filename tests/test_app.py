"""The app as users and API clients see it, on the tiny preset."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from app import SHARE_WITHOUT_AUTH_WARNING, build_demo, launch_options, parse_args
from pipelines.registry import build_registry


def test_app_builds_blocks_for_every_registered_tab():
    registry = build_registry("tiny")
    demo = build_demo(registry)
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert "text" in registry
    assert "generate_text" in api_names


def test_generate_text_streams_chunks_in_order(tiny_client):
    job = tiny_client.submit("hello there", "", "", "vanilla", 12, 0.0, 1.0, 5, api_name="/generate_text")
    final_text, stats = job.result(timeout=120)
    outputs = job.outputs()
    texts = [text for text, _ in outputs]
    assert len(outputs) >= 2
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert final_text == texts[-1]
    assert stats["tokens"] >= 1 and stats["seed"] == 5
    assert isinstance(stats["tokens_per_s"], (int, float))


def test_generate_text_is_reproducible_from_seed(tiny_client):
    args = ("a red hat", "", "", "vanilla", 10, 0.9, 0.9, 123)
    first = tiny_client.predict(*args, api_name="/generate_text")
    second = tiny_client.predict(*args, api_name="/generate_text")
    assert first[0] == second[0]


def test_empty_prompt_gives_clear_error_and_server_keeps_serving(tiny_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Prompt is empty"):
        tiny_client.predict("   ", "", "", "vanilla", 5, 0.0, 1.0, 1, api_name="/generate_text")
    text, stats = tiny_client.predict("ok", "", "", "vanilla", 3, 0.0, 1.0, 1, api_name="/generate_text")
    assert stats["tokens"] >= 1


def test_share_without_auth_warns():
    args = parse_args(["--share"])
    with pytest.warns(UserWarning, match="without --auth"):
        options = launch_options(args)
    assert options["show_error"] is False
    assert "without --auth" in SHARE_WITHOUT_AUTH_WARNING


@pytest.mark.slow
def test_cli_starts_tiny_app_quickly_and_exposes_generate_text():
    from gradio_client import Client

    port = 7961
    process = subprocess.Popen([sys.executable, "app.py", "--preset", "tiny", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        client = None
        while time.monotonic() - start < 60:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                time.sleep(0.5)
        assert client is not None, "app did not start within 60 s"
        assert "/generate_text" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_auto_preset_offline_chats_with_packaged_smollm2():
    from gradio_client import Client

    from pipelines.models import ModelStore

    registry = build_registry("auto", ModelStore())
    demo = build_demo(registry)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        text, stats = client.predict("What is the capital of France?", "", "", "vanilla", 24, 0.0, 1.0, 0,
                                     api_name="/generate_text")
    finally:
        demo.close()
    assert stats["model"].startswith("SmolLM2-135M-Instruct")
    assert "Paris" in text
