"""Request bounds (issue 25): huge prompts refused before any tokenizer, streamed (chunked) bodies counted, uploads
charged to a per-session budget, the temp files of refused uploads deleted."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from quality_support import GENERIC_ERROR, free_port, raw_call, shared_app
from request_guard import MAX_FORMLESS_BYTES, MAX_REQUEST_BYTES, UPLOAD_TTL_S, RequestGuard, UploadLedger, session_key

MB = 1_000_000
BOUNDARY = "guardtestboundary"


def multipart_chunks(sizes: list[int]):
    """A multipart body of one file per size, yielded in 1 MB pieces: httpx sends a generator chunked, without
    a Content-Length, so only counting the stream can catch it."""
    for index, size in enumerate(sizes):
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="part{index}.bin"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for start in range(0, size, MB):
            yield b"\1" * min(MB, size - start)
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def upload_chunked(url: str, sizes: list[int]) -> httpx.Response:
    return httpx.post(f"{url.rstrip('/')}/gradio_api/upload", content=multipart_chunks(sizes), timeout=60,
                      headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})


def upload(url: str, size: int) -> httpx.Response:
    return httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("f.bin", b"\2" * size)}, timeout=60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def guarded_app(tmp_path, monkeypatch):
    """A minimal Gradio app (its real upload route) behind RequestGuard, with its own temp folder; yields a
    function ``launch(ledger) -> url``."""
    import gradio as gr
    from starlette.middleware import Middleware

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demos = []

    def launch(ledger: UploadLedger) -> str:
        with gr.Blocks() as demo:
            gr.File()
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                    max_file_size="25mb", app_kwargs={"middleware": [Middleware(RequestGuard, ledger=ledger)]})
        demos.append(demo)
        return demo.local_url

    yield launch
    for demo in demos:
        demo.close()


def temp_files(tmp_path: Path) -> list[Path]:
    return [path for path in (tmp_path / "gradio").rglob("*") if path.is_file()]


def test_a_chunked_upload_over_the_request_cap_is_refused_and_leaves_no_temp_file(guarded_app, tmp_path):
    url = guarded_app(UploadLedger())
    refused = upload_chunked(url, [16 * MB, 16 * MB])  # each file under the 25 MB per-file limit
    assert refused.status_code == 413, f"a streamed 32 MB body got {refused.status_code}"
    assert f"{MAX_REQUEST_BYTES:,}" in refused.json()["error"]
    assert temp_files(tmp_path) == [], "the refused upload's partial files stayed in the temp folder"
    accepted = upload_chunked(url, [2 * MB])
    assert accepted.status_code == 200 and Path(accepted.json()[0]).stat().st_size == 2 * MB


def test_a_chunked_json_body_over_the_cap_is_refused_while_streaming():
    def body():
        yield b'{"data": ["'
        for _ in range(MAX_REQUEST_BYTES // MB + 2):
            yield b"a" * MB
        yield b'"]}'

    base = shared_app().url.rstrip("/")
    refused = httpx.post(f"{base}/gradio_api/call/generate_text", content=body(), timeout=60,
                         headers={"content-type": "application/json"})
    assert refused.status_code == 413, f"a streamed {MAX_REQUEST_BYTES // MB + 2} MB body got {refused.status_code}"
    assert f"{MAX_FORMLESS_BYTES:,}" in refused.json()["error"]
    assert raw_call(shared_app().url, "text",
                    ["ok", "", "", "vanilla", 2, 0.0, 1.0, 1, 0, 1.0, "", False])[0] == "complete"


def test_uploads_are_charged_to_the_session_budget_until_they_expire(guarded_app):
    clock = FakeClock()
    url = guarded_app(UploadLedger(limit=3 * MB, ttl_s=UPLOAD_TTL_S, clock=clock))
    assert upload(url, MB).status_code == 200
    assert upload(url, MB).status_code == 200
    over = upload(url, int(1.5 * MB))
    assert over.status_code == 413, f"uploads over the session budget got {over.status_code}"
    assert upload_chunked(url, [int(1.5 * MB)]).status_code == 413, "a streamed upload escaped the budget"
    assert upload(url, MB // 2).status_code == 200, "refused uploads must not be charged"
    clock.now += UPLOAD_TTL_S + 1  # Gradio has deleted the earlier files by now
    assert upload(url, 2 * MB).status_code == 200


def test_the_ledger_counts_uploads_in_flight_and_forgets_refused_ones():
    clock = FakeClock()
    ledger = UploadLedger(limit=10, ttl_s=60, clock=clock)
    ledger.receive("a", 4)
    assert ledger.remaining("a") == 6 and ledger.remaining("b") == 10
    ledger.settle("a", 4, kept=True)
    ledger.receive("a", 5)
    ledger.settle("a", 5, kept=False)
    assert ledger.used("a") == 4
    clock.now += 61
    assert ledger.used("a") == 0
    ledger.receive("b", 3)
    ledger.settle("b", 3, kept=False)
    assert ledger.sessions() == 1, "sessions with nothing kept must be forgotten, or the ledger grows per address"
    clock.now += 61
    ledger.receive("a", 1)
    ledger.settle("a", 1, kept=False)
    assert ledger.sessions() == 0


def test_sessions_are_keyed_by_a_valid_login_token_only():
    class App:
        tokens = {"good-token": "alice"}

    scope = {"app": App(), "client": ("10.0.0.7", 5555)}
    assert session_key(scope, {b"cookie": b"access-token-x=good-token"}) == "login:good-token"
    assert session_key(scope, {b"cookie": b"access-token-x=made-up"}) == "address:10.0.0.7"
    assert session_key(scope, {}) == "address:10.0.0.7"


class PeakRss:
    """The highest RSS of this process (the in-process server's too) while the block runs, sampled every 5 ms."""

    def __enter__(self) -> "PeakRss":
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MB


@pytest.fixture
def tokenizer_calls(monkeypatch) -> list[str]:
    """Every call of a transformers tokenizer's encoding entry points in this process."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    calls: list[str] = []
    for name in ("__call__", "encode", "encode_plus", "apply_chat_template"):
        original = getattr(PreTrainedTokenizerBase, name, None)
        if original is None:
            continue

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerBase, name, spy)
    return calls


@pytest.mark.parametrize("megabytes,expected", [
    (30, "413"),  # the probe of issue 25: over the body cap, refused before the body is read
    (MAX_FORMLESS_BYTES / MB - 0.1, "20,000"),  # the largest body let through: refused by the character bound
])
def test_a_huge_prompt_is_refused_fast_with_flat_memory_before_any_tokenizer(megabytes, expected, tokenizer_calls):
    url = shared_app().url
    raw_call(url, "text", ["warm", "", "", "vanilla", 1, 0.0, 1.0, 1, 0, 1.0, "", False])
    tokenizer_calls.clear()
    body = json.dumps({"data": ["a" * int(megabytes * MB), "", "", "vanilla", 4, 0.0, 1.0, 1, 0, 1.0, "",
                                False]}).encode()
    with PeakRss() as memory:  # times the server: the body is encoded before
        started = time.perf_counter()
        event, payload = raw_call(url, "text", body)
        elapsed = time.perf_counter() - started
    print(f"{megabytes:.1f} MB prompt refused in {elapsed:.3f} s, peak RSS growth {memory.growth_mb:.0f} MB")
    assert event in ("http", "error") and expected in str(payload) and GENERIC_ERROR not in str(payload), payload
    assert elapsed < 1.0, f"refusing a {megabytes} MB prompt took {elapsed:.2f} s"
    assert memory.growth_mb < 150, f"refusing a {megabytes} MB prompt grew RSS by {memory.growth_mb:.0f} MB"
    assert tokenizer_calls == [], f"a tokenizer ran before the refusal: {tokenizer_calls}"
    raw_call(url, "text", ["a short prompt", "", "", "vanilla", 2, 0.0, 1.0, 1, 0, 1.0, "", False])
    assert tokenizer_calls, "the spy saw no tokenizer call for a valid prompt: it watches the wrong methods"


def test_gradio_deletes_temp_files_when_the_upload_budget_forgets_them():
    """Uploads and cached outputs of finished requests are deleted by Gradio (Blocks.delete_cache) after the
    same time the session budget charges them for, so the budget bounds what a session holds on disk."""
    from app import build_demo

    sweep_s, age_s = build_demo({}).delete_cache
    assert age_s == UPLOAD_TTL_S and 0 < sweep_s <= age_s / 4
