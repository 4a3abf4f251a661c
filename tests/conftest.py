"""Shared fixtures: offline by default, tiny models built in-process, a launched tiny app."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENWORKS_OUTPUT_DIR", os.path.join(os.path.dirname(__file__), "..", ".test-outputs"))

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.models import ModelStore  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch) -> ModelStore:
    monkeypatch.setenv("TOKENWORKS_CACHE", str(tmp_path / "cache"))
    return ModelStore(packaged={})


@pytest.fixture(scope="module")
def models() -> dict:
    """The decoding tests' tiny causal LMs by family, fresh per test module (seed 0)."""
    from decoding_support import FAMILIES
    from pipelines.tiny import tiny_causal_lm

    return {family: tiny_causal_lm(family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: on a shared 2-core box a second intra-op thread costs more than it gives
    (10x in the motion trainer's tests). Use with ``pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_app():
    """The app built with the tiny preset and launched on a free local port; yields its URL."""
    from app import build_demo
    from pipelines.registry import build_registry

    demo = build_demo(build_registry("tiny"))
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, show_error=True,
                quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="session")
def tiny_client(tiny_app):
    from gradio_client import Client

    return Client(tiny_app, verbose=False)


@pytest.fixture
def hub_offline_empty_cache(tmp_path, monkeypatch):
    """A machine with an empty Hugging Face cache and no Hub: every Hub model needs a download."""
    from pipelines import models

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    return cache
