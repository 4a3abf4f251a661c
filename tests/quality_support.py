"""Shared by the quality gates: a per-tab table, app launchers, and API calls built from ``view_api``.

Every gate loops over the tabs the registry actually builds, so a tab is covered the moment it is
registered. ``TAB_CASES`` only makes a tab's requests fast (few tokens/steps, small sizes); a tab missing
from it still gets a request built from its endpoint's defaults and its prompt box.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ARTEFACTS = REPO / ".test-outputs"

PROMPT_LABELS = ("Prompt", "Lyrics", "Text")
SEED_LABEL = "Seed (-1 = random)"
NUMERIC_COMPONENTS = {"Number", "Slider"}
FILE_COMPONENTS = {"Image", "Audio", "Video", "File", "Gallery", "Model3D"}
JSON_COMPONENTS = {"Json", "Code"}
GENERIC_ERROR = "has not enabled verbose error reporting"


@dataclass(frozen=True)
class TabCase:
    """How to drive one tab fast. Values are keyed by the widget's label, as a person sees them."""

    valid: dict[str, Any]  # a fast request that must succeed
    long: dict[str, Any]  # a request that runs long enough to Stop it mid-way
    sampled: dict[str, Any] = field(default_factory=dict)  # makes the output depend on the seed
    stream: str = "replace"  # "prefix": each streamed text extends the previous one
    numeric_stats: tuple[str, ...] = ("seed",)
    forward_delay_s: float = 0.0  # slows each model forward in the Stop gate when ``long`` alone is too quick


TAB_CASES: dict[str, TabCase] = {
    "text": TabCase(
        valid={"Prompt": "A red hat and a blue car.", "Max new tokens": 6, SEED_LABEL: 7},
        long={"Prompt": "1 2 3 4 5", "Max new tokens": 480, SEED_LABEL: 1,  # greedy: no EOS within 480
              "Temperature (0 = greedy)": 0.0},
        sampled={"Temperature (0 = greedy)": 1.0, "Top-p": 1.0, "Max new tokens": 8},
        stream="prefix",
        forward_delay_s=0.01,
        numeric_stats=("seed", "tokens", "time_s", "tokens_per_s", "time_to_first_token_s", "forwards", "tau"),
    ),
    "image": TabCase(
        valid={"Prompt": "a [red hat] and a [blue car]", "Steps": 2, SEED_LABEL: 7,
               "A/B: also render the baseline with the same seed": False},
        long={"Prompt": "a red hat", "Steps": 150, SEED_LABEL: 1,
              "A/B: also render the baseline with the same seed": False},
        numeric_stats=("seed", "time_s"),
    ),
    "video": TabCase(
        valid={"Prompt": "a red fox in snow", "Frames": 2, "Steps": 1, SEED_LABEL: 7},
        long={"Prompt": "a red fox in snow", "Frames": 16, "Steps": 100, SEED_LABEL: 1},
        numeric_stats=("seed", "time_s", "frames"),
    ),
    "speech": TabCase(
        valid={"Text": "Hi.", SEED_LABEL: 7},
        long={"Text": "The quick brown fox jumps over the lazy dog. " * 3, "Temperature (0 = greedy)": 0.0,
              SEED_LABEL: 1},
        numeric_stats=("seed", "time_s", "audio_s", "time_to_first_audio_s"),
    ),
    "song": TabCase(
        valid={"Duration (s)": 1, "Mode": "mixed", "Diffusion steps (mixed mode)": 1, SEED_LABEL: 7},
        long={"Duration (s)": 10, "Mode": "dual", SEED_LABEL: 1},
        numeric_stats=("seed", "time_s", "audio_s"),
    ),
}


def tab_case(task: str, params: list[dict]) -> TabCase:
    """The table entry for ``task``, or one derived from its endpoint: defaults plus a prompt."""
    if task in TAB_CASES:
        return TAB_CASES[task]
    prompt = prompt_label(params)
    valid = {prompt: "a red hat"} if prompt else {}
    return TabCase(valid=valid, long=valid)


def prompt_label(params: list[dict]) -> str | None:
    for param in params:
        if param["component"] == "Textbox" and any(param["label"].startswith(p) for p in PROMPT_LABELS):
            return param["label"]
    return None


def registered_tasks() -> list[str]:
    from pipelines.registry import PIPELINE_CLASSES, TASK_ORDER

    return [task for task in TASK_ORDER if task in PIPELINE_CLASSES]


# --- launching -------------------------------------------------------------------------------------------


@dataclass
class LaunchedApp:
    url: str
    demo: Any
    registry: dict

    @property
    def store(self):
        return next(iter(self.registry.values())).store

    def close(self) -> None:
        self.demo.close()


_shared: LaunchedApp | None = None


def launch_in_process(queue_max_size: int | None = None) -> LaunchedApp:
    """The tiny-preset app on a free port in this process, errors shown only when they are gr.Errors."""
    from app import build_demo, launch_options, parse_args
    from pipelines.registry import build_registry

    registry = build_registry("tiny")
    demo = build_demo(registry)
    if queue_max_size is not None:
        demo.queue(max_size=queue_max_size, default_concurrency_limit=None)
    options = launch_options(parse_args(["--port", str(free_port())]))
    options.update(show_error=False, quiet=True, prevent_thread_lock=True, css_paths=None)
    demo.launch(**options)
    return LaunchedApp(demo.local_url, demo, registry)


def shared_app() -> LaunchedApp:
    """One in-process tiny app for every API gate in this pytest run (closed at exit)."""
    global _shared
    if _shared is None:
        _shared = launch_in_process()
        atexit.register(_shared.close)
    return _shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app_process(*args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python app.py --preset tiny ARGS`` in a subprocess on a free port; returns it once it answers."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTEFACTS / f"app-{port}.log", "w")
    process = subprocess.Popen([sys.executable, "app.py", "--preset", "tiny", "--port", str(port), *args],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {log.name}")
        try:
            httpx.get(url, timeout=2.0)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    stop_process(process)
    raise RuntimeError(f"app.py did not answer on {url} within {timeout:.0f} s; see {log.name}")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


# --- calling the API -------------------------------------------------------------------------------------


def client_for(url: str, **kwargs):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(ARTEFACTS / "downloads"), **kwargs)


def endpoint_params(api: dict, task: str) -> list[dict]:
    return api["named_endpoints"][f"/generate_{task}"]["parameters"]


def positional_args(params: list[dict], values: dict[str, Any]) -> list[Any]:
    """Arguments in endpoint order: ``values`` by label, else the widget default ("" for empty text)."""
    labels = [param["label"] for param in params]
    unknown = set(values) - set(labels)
    assert not unknown, f"labels {sorted(unknown)} are not inputs of this endpoint (it has {labels})"
    args = []
    for param in params:
        if param["label"] in values:
            args.append(values[param["label"]])
        elif param["parameter_has_default"]:
            args.append(param["parameter_default"])
        else:
            args.append("" if param["component"] == "Textbox" else None)
    return args


def submit(client, api: dict, task: str, values: dict[str, Any]):
    """Start a /generate_<task> job with ``values`` (by label) over the tab's defaults."""
    return client.submit(*positional_args(endpoint_params(api, task), values), api_name=f"/generate_{task}")


def run_job(job, timeout: float = 180.0) -> list[Any]:
    """Every output a job streamed, in order (``job.result()`` alone only waits)."""
    job.result(timeout=timeout)
    return [list(output) for output in job.outputs()]


def raw_call(url: str, task: str, data: list[Any] | bytes, timeout: float = 120.0) -> tuple[str, Any]:
    """POST ``data`` as-is (NaN and infinities included; bytes: an encoded body) to the raw HTTP API; returns
    (event, payload)."""
    base = url.rstrip("/")
    body = data if isinstance(data, bytes) else json.dumps({"data": data}, allow_nan=True)
    response = httpx.post(f"{base}/gradio_api/call/generate_{task}", content=body,
                          headers={"content-type": "application/json"}, timeout=timeout)
    if response.status_code != 200:
        return "http", f"{response.status_code} {response.text}"
    event_id = response.json()["event_id"]
    event, payload = "", None
    with httpx.stream("GET", f"{base}/gradio_api/call/generate_{task}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = json.loads(line.split(":", 1)[1].strip() or "null")
                if event == "error" and isinstance(payload, dict):
                    payload = payload.get("error") or GENERIC_ERROR  # no message: not a gr.Error
                if event in {"complete", "error"}:
                    return event, payload
    return event, payload


def stats_of(outputs: list[list[Any]]) -> dict:
    stats = outputs[-1][-1]
    assert isinstance(stats, dict), f"the last output of every endpoint is a stats dict, got {stats!r}"
    return stats


def fingerprint(value: Any) -> Any:
    """A comparable digest of an output: text as is, media by their decoded samples or pixels."""
    if isinstance(value, dict) and "path" in value:
        value = value["path"]
    if isinstance(value, dict):  # a gallery item: {"image" or "video": path, "caption": ...}
        return {key: fingerprint(item) for key, item in value.items() if key != "caption"}
    if isinstance(value, (list, tuple)):
        return [fingerprint(item) for item in value]
    if isinstance(value, str) and os.path.isfile(value):
        path = Path(value)
        suffix = path.suffix.lower()
        if suffix == ".json":  # a sidecar: parameters and timings, not the output itself
            return "sidecar"
        if suffix == ".m3u8":  # a streamed output's playlist: chunk names differ per run, the result does not
            return "stream"
        if suffix in {".png", ".jpg", ".jpeg", ".webp"}:
            import numpy as np
            from PIL import Image

            data = np.asarray(Image.open(path)).tobytes()
        elif suffix in {".wav", ".flac", ".ogg"}:
            import soundfile

            data = soundfile.read(path, dtype="float32")[0].tobytes()
        else:
            data = path.read_bytes()
        return hashlib.sha256(data).hexdigest()
    return value


def decode_special(value: Any) -> Any:
    """Corpus values that JSON cannot spell: {"float": "nan"}, {"repeat": s, "times": n}."""
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, dict) and set(value) == {"repeat", "times"}:
        return value["repeat"] * value["times"]
    return value


def is_update(value: Any) -> bool:
    """A Gradio update dict (what gr.skip() and gr.update() become): not a value an API caller can use."""
    return isinstance(value, dict) and "__type__" in value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def assert_clear_error(message: str, expected: str) -> None:
    """A gr.Error the user can act on: not Gradio's generic message, no stack trace, the expected words."""
    import re

    assert message, "the error has no message"
    assert GENERIC_ERROR not in message, "a raw exception reached the client instead of a gr.Error"
    assert "Traceback" not in message and 'File "' not in message, f"stack trace sent to the client: {message}"
    assert re.search(expected, message, re.IGNORECASE), f"{message!r} does not match {expected!r}"


def hook_model_forwards(before: Callable[[], None]) -> Callable[[], None]:
    """Call ``before()`` at the start of every outermost module call in this process (a model forward, not
    its layers), whichever model or submodule a pipeline calls, loaded now or later. Returns the remover."""
    from torch.nn.modules import module

    depth = threading.local()

    def enter(*_):
        depth.value = getattr(depth, "value", 0) + 1
        if depth.value == 1:
            before()

    def leave(*_):
        depth.value -= 1

    handles = [module.register_module_forward_pre_hook(enter),
               module.register_module_forward_hook(leave, always_call=True)]
    return lambda: [handle.remove() for handle in handles]
