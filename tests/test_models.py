"""ModelStore: resolution order, offline errors, memory budget, remote-code refusal."""
from __future__ import annotations

import gc
import json
import time
import weakref

import pytest
import torch

from pipelines import models
from pipelines.base import PipelineError
from pipelines.models import ModelSpec, ModelStore, ModelUnavailable, module_nbytes
from pipelines.presets import PRESETS, default_model, models_for


def fake_loader(nbytes: int):
    def load(resolved, store):
        return torch.nn.Linear(nbytes // 4, 1, bias=False)  # float32 weight of exactly nbytes

    return load


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding one snapshot of 'org/cached'."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return snapshot


def test_resolution_prefers_local_path_then_cache_then_package_then_hub(tmp_path, hub_cache, monkeypatch):
    packaged_dir = tmp_path / "packaged"
    packaged_dir.mkdir()
    store = ModelStore(packaged={"pkg": lambda spec: str(packaged_dir)})
    monkeypatch.setattr(models, "hub_reachable", lambda: True)

    local = tmp_path / "local-model"
    local.mkdir()
    assert store.resolve(ModelSpec("a", "x", hub_id=str(local), package="pkg")).source == "local"
    cached = store.resolve(ModelSpec("b", "x", hub_id="org/cached", package="pkg"))
    assert (cached.source, cached.location) == ("cache", str(hub_cache))
    assert store.resolve(ModelSpec("c", "x", hub_id="org/not-cached", package="pkg")).source == "package"
    hub = store.resolve(ModelSpec("d", "x", hub_id="org/not-cached"))
    assert (hub.source, hub.location) == ("hub", "org/not-cached")


def test_offline_missing_model_error_names_model_and_how_to_get_it(hub_cache, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    store = ModelStore(packaged={})
    with pytest.raises(ModelUnavailable) as error:
        store.resolve(ModelSpec("big", "causal-lm", hub_id="org/missing-model"))
    message = str(error.value)
    assert "org/missing-model" in message and "hf download org/missing-model" in message
    assert models.hub_cache_dir() in message  # where the copied cache must go
    assert "marked 'available here'" in message  # the words the model pickers use


def test_offline_error_is_fast_when_hub_unreachable(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_probe", None)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://127.0.0.1:9")  # refuses at once
    store = ModelStore(packaged={})
    start = time.monotonic()
    with pytest.raises(ModelUnavailable):
        store.resolve(ModelSpec("m", "x", hub_id="org/missing"))
    assert time.monotonic() - start < models.HUB_PROBE_TIMEOUT_S + 1.0


def test_hf_hub_offline_env_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models.socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    assert models.hub_reachable() is False


def test_loads_lazily_once_and_reuses(store):
    calls = []

    def loader(resolved, s):
        calls.append(resolved.source)
        return torch.nn.Linear(4, 4)

    spec = ModelSpec("tiny", "x", tiny=True)
    first = store.load(spec, loader)
    assert store.load(spec, loader) is first
    assert calls == ["tiny"]


def test_eviction_keeps_models_within_budget_least_recently_used_first():
    store = ModelStore(packaged={}, budget_bytes=1000)
    a, b, c = (ModelSpec(n, "x", tiny=True) for n in "abc")
    store.load(a, fake_loader(400))
    store.load(b, fake_loader(400))
    store.load(a, fake_loader(400))  # touch a: b is now least recently used
    store.load(c, fake_loader(400))
    assert store.loaded_names() == ["a", "c"]
    assert store.used_bytes() == 800 <= store.budget_bytes


def test_a_loaded_model_is_out_of_the_collectors_scans_and_still_freed_on_unload(store):
    """Full collections rescanning a loaded model cost a served request ~2 s (SmolLM2-135M on a 2-core CPU)."""
    spec = ModelSpec("m", "x", tiny=True)
    model = store.load(spec, fake_loader(64))
    model.itself = [model]  # a reference cycle: only the collector can free it
    assert not any(tracked is model for tracked in gc.get_objects())
    freed = weakref.ref(model)
    del model
    store.unload("m")
    assert freed() is None


def test_explicit_unload_frees_the_entry(store):
    spec = ModelSpec("m", "x", tiny=True)
    store.load(spec, fake_loader(64))
    assert store.unload("m") is True
    assert store.loaded_names() == [] and store.used_bytes() == 0
    assert store.unload("m") is False


def test_module_nbytes_counts_shared_tensors_once():
    layer = torch.nn.Linear(8, 8, bias=False)
    assert module_nbytes([layer, layer]) == 8 * 8 * 4


def test_model_needing_remote_code_is_refused(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    store = ModelStore(packaged={})
    with pytest.raises(PipelineError, match="remote code"):
        store.load(ModelSpec("r", "x", hub_id=str(folder)), fake_loader(8))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_lists_a_text_model(preset, store):
    assert models_for("text", preset)
    assert default_model("text", preset, store).name


def test_tiny_preset_builds_and_generates(store):
    from pipelines.tabs.text import TextPipeline, TextRequest

    result = TextPipeline(store, "tiny").run(TextRequest(prompt="hi", max_new_tokens=5, seed=1))
    assert 1 <= result.stats["tokens"] <= 5
    assert result.stats["forwards"] == result.stats["tokens"] and result.stats["tau"] == 1.0


def test_availability_says_here_or_which_repositories_to_fetch(hub_cache, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    store = ModelStore(packaged={})
    cached = store.availability(ModelSpec("c", "x", hub_id="org/cached"))
    assert cached.here and cached.usable and cached.label == "available here"
    missing = store.availability(ModelSpec("m", "x", hub_id="org/missing"))
    assert (missing.here, missing.usable, missing.missing) == (False, False, ("org/missing",))
    assert missing.label == "needs a download (Hub unreachable)"
    # AnimateDiff sits on a base model: a cached adapter alone is not enough.
    adapter = store.availability(ModelSpec("a", "animatediff", hub_id="org/cached", options=(("base", "org/base"),)))
    assert not adapter.here and adapter.missing == ("org/base",)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    online = store.availability(ModelSpec("m", "x", hub_id="org/missing"))
    assert online.usable and not online.here and online.label == "needs a download (on first use)"


def test_availability_of_packaged_weights_never_converts_them():
    def converting_resolver(spec):
        raise AssertionError("the availability query ran the (converting) resolver")

    spec = ModelSpec("p", "causal-lm", package="pkg")
    installed = ModelStore(packaged={"pkg": converting_resolver}, installed={"pkg": lambda: True})
    assert installed.availability(spec).here
    absent = ModelStore(packaged={"pkg": converting_resolver}, installed={"pkg": lambda: False}).availability(spec)
    assert not absent.usable and absent.package == "pkg" and "make setup" in absent.label


def test_default_store_checks_every_packaged_model_cheaply():
    from pipelines.packaged import PACKAGED_INSTALLED, PACKAGED_RESOLVERS

    assert set(PACKAGED_INSTALLED) == set(PACKAGED_RESOLVERS)
    assert set(ModelStore().installed) == set(PACKAGED_INSTALLED)


def test_pickers_mark_each_model_and_say_what_an_offline_tab_needs(hub_cache, monkeypatch, tmp_path):
    from pipelines import microworld
    from pipelines.tabs.video import VideoPipeline

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(microworld, "WEIGHTS_MOTION_V2", tmp_path / "absent")  # the video list as Hub models only
    video = VideoPipeline(ModelStore(packaged={}), "auto")
    assert video.model_choices() == [(f"{name} · needs a download (Hub unreachable)", name)
                                     for name in video.model_names()]
    assert not video.usable()
    assert video.fetch_plan() == [("AnimateDiff v1-5-3 on SD1.5", ["guoyww/animatediff-motion-adapter-v1-5-3",
                                                                    "stable-diffusion-v1-5/stable-diffusion-v1-5"])]
    tiny = VideoPipeline(ModelStore(packaged={}), "tiny")
    assert tiny.usable() and all(label.endswith("· available here") for label, _ in tiny.model_choices())


def test_readme_spaces_header_lists_every_hub_model_the_app_may_load():
    """Spaces links (and can preload) the models named in the README's front matter: it must follow the presets."""
    from pathlib import Path

    from pipelines.presets import AUTO_MODELS

    hub_model_ids = sorted({spec.hub_id for specs in AUTO_MODELS.values() for spec in specs if spec.hub_id})
    front_matter = (Path(__file__).parents[1] / "README.md").read_text().split("---\n")[1]
    listed = front_matter.split("models:\n", 1)[1].splitlines()
    assert [line.removeprefix("  - ") for line in listed if line.startswith("  - ")] == hub_model_ids
