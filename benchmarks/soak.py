"""Soak: mixed valid and invalid requests from concurrent gradio_client clients against the tiny app (issue 25).

Launches ``python app.py --preset tiny`` on 127.0.0.1 (loopback only) and runs ``--clients`` clients for
``--minutes``. Each client loops: pick a request kind (a valid request of a random tab, a prompt that is empty or
over the character limit, an out-of-range number, a 31 MB JSON body, a 31 MB chunked upload, a small upload),
send it, wait up to ``--timeout`` s, then pause ``--pause`` s (a shared machine: fewer requests per minute).

Outcomes: ``ok`` (the job completed; every output file is opened and decoded), ``error`` (the app answered with
an error message or a 4xx), ``lost`` (no answer and no error within the timeout, or the connection failed).
RSS of the server is sampled every ``--sample`` s; growth = median of the last minute over the median of the
minute after ``--warmup`` s (models loaded, every kind seen), so loading is not counted as growth.

    nice -n 19 python benchmarks/soak.py --minutes 30 --json benchmarks/results/soak_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.report import command_line, write_report  # noqa: E402
from pipelines.base import MAX_TEXT_CHARS  # noqa: E402
from quality_support import TAB_CASES, endpoint_params, positional_args, prompt_label  # noqa: E402
from quality_support import start_app_process, stop_process  # noqa: E402
from request_guard import MAX_REQUEST_BYTES  # noqa: E402

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".gif"}


# --- the requests -----------------------------------------------------------------------------------------


class Soaker:
    """One client's view: a gradio_client Client, the API description, and where its downloads go."""

    def __init__(self, url: str, downloads: Path, timeout: float, rng: random.Random) -> None:
        from gradio_client import Client

        self.url, self.timeout, self.rng = url, timeout, rng
        self.downloads = downloads
        # gradio_client's own HTTP calls (queue join, cancel, upload) use httpx's 5 s default: on a starved CPU the
        # server may acknowledge a join later than that, and the client then drops a job the server still runs.
        self.client = Client(url, verbose=False, download_files=str(downloads), httpx_kwargs={"timeout": timeout})
        self.api = self.client.view_api(print_info=False, return_format="dict")
        self.last_task: str | None = None
        self.tasks = [name.removeprefix("/generate_") for name in self.api["named_endpoints"]
                      if name.startswith("/generate_") and name.removeprefix("/generate_") in TAB_CASES]

    def call(self, task: str, values: dict[str, Any]) -> tuple[str, str]:
        """Submit /generate_<task>; ``ok`` only when every output file decodes."""
        from gradio_client.exceptions import AppError

        self.last_task = task
        args = positional_args(endpoint_params(self.api, task), {**TAB_CASES[task].valid, **values})
        job = self.client.submit(*args, api_name=f"/generate_{task}")
        try:
            outputs = job.result(timeout=self.timeout)
        except AppError as error:
            return "error", str(error)[:200]
        except TimeoutError:
            threading.Thread(target=job.cancel, daemon=True).start()
            return "lost", f"no answer within {self.timeout:.0f} s"
        unreadable = [f"{path}: {problem}" for path in output_files(outputs) if (problem := unreadable_reason(path))]
        shutil.rmtree(self.downloads, ignore_errors=True)
        return ("unreadable", "; ".join(unreadable)[:300]) if unreadable else ("ok", "")

    def prompt_of(self, task: str) -> str | None:
        return prompt_label(endpoint_params(self.api, task))

    def raw(self, send: Callable[[httpx.Client], httpx.Response]) -> tuple[str, str]:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
            response = send(http)
        status = response.status_code
        outcome = "ok" if status < 300 else "error" if status < 500 else "server_error"
        return outcome, f"{status} {response.text[:120]}"


def valid_request(soaker: Soaker) -> tuple[str, str]:
    return soaker.call(soaker.rng.choice(soaker.tasks), {})


def empty_prompt(soaker: Soaker) -> tuple[str, str]:
    task = soaker.rng.choice([task for task in soaker.tasks if soaker.prompt_of(task)])
    return soaker.call(task, {soaker.prompt_of(task): "   "})


def overlong_prompt(soaker: Soaker) -> tuple[str, str]:
    task = soaker.rng.choice([task for task in soaker.tasks if soaker.prompt_of(task)])
    return soaker.call(task, {soaker.prompt_of(task): "word " * (MAX_TEXT_CHARS // 4)})


def out_of_range_number(soaker: Soaker) -> tuple[str, str]:
    task = soaker.rng.choice(soaker.tasks)
    sliders = [param for param in endpoint_params(soaker.api, task) if param["component"] == "Slider"]
    slider = soaker.rng.choice(sliders)
    return soaker.call(task, {slider["label"]: 10**9})


def oversize_json_body(soaker: Soaker) -> tuple[str, str]:
    task = soaker.rng.choice(soaker.tasks)
    body = b'{"data": ["' + b"a" * (MAX_REQUEST_BYTES + 1_000_000) + b'"]}'
    return soaker.raw(lambda http: http.post(f"/gradio_api/call/generate_{task}", content=body,
                                             headers={"content-type": "application/json"}))


def oversize_chunked_upload(soaker: Soaker) -> tuple[str, str]:
    boundary = "soakboundary"

    def body():  # a generator: httpx sends it chunked, with no Content-Length
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(MAX_REQUEST_BYTES // 1_000_000 + 2):
            yield b"\0" * 1_000_000
        yield f"\r\n--{boundary}--\r\n".encode()

    return soaker.raw(lambda http: http.post(
        "/gradio_api/upload", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}))


def small_upload(soaker: Soaker) -> tuple[str, str]:
    payload = os.urandom(50_000)
    return soaker.raw(lambda http: http.post("/gradio_api/upload", files={"files": ("small.bin", payload)}))


KINDS: dict[str, tuple[Callable[[Soaker], tuple[str, str]], float]] = {  # name: (request, weight)
    "valid": (valid_request, 6.0),
    "empty_prompt": (empty_prompt, 1.0),
    "overlong_prompt": (overlong_prompt, 1.0),
    "out_of_range_number": (out_of_range_number, 1.0),
    "oversize_json_body": (oversize_json_body, 0.5),
    "oversize_chunked_upload": (oversize_chunked_upload, 0.5),
    "small_upload": (small_upload, 0.5),
}
# What each kind must get: a valid request an answer, an invalid one a clear error.
EXPECTED = {"valid": "ok", "small_upload": "ok"}


# --- checking outputs -------------------------------------------------------------------------------------


def output_files(value: Any) -> list[str]:
    """Every local file path in a job's outputs (media dicts, galleries, plain paths)."""
    if isinstance(value, dict):
        return [path for item in value.values() for path in output_files(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in output_files(item)]
    if isinstance(value, str) and len(value) < 4096 and os.path.isfile(value):
        return [value]
    return []


def unreadable_reason(path: str) -> str | None:
    """None when the file decodes as what its suffix says, else why not."""
    suffix = Path(path).suffix.lower()
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        if suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        elif suffix in AUDIO_SUFFIXES:
            import soundfile

            if soundfile.read(path)[0].size == 0:
                return "no samples"
        elif suffix in VIDEO_SUFFIXES:
            probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                                    "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", path],
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode != 0 or not probe.stdout.strip().isdigit() or int(probe.stdout.strip()) == 0:
                return f"ffprobe: {probe.stderr.strip()[:100] or 'no frames'}"
        elif suffix == ".json":
            json.loads(Path(path).read_text())
        else:
            Path(path).read_bytes()
    except Exception as error:  # any failure to decode is the finding
        return f"{type(error).__name__}: {error}"[:200]
    return None


# --- the run ----------------------------------------------------------------------------------------------


def client_loop(index: int, url: str, deadline: float, args: argparse.Namespace, records: list, lock) -> None:
    rng = random.Random(args.seed + index)
    downloads = Path(tempfile.mkdtemp(prefix=f"soak-{index}-"))
    soaker = Soaker(url, downloads, args.timeout, rng)
    names, weights = list(KINDS), [weight for _, weight in KINDS.values()]
    while time.monotonic() < deadline:
        kind = rng.choices(names, weights)[0]
        started, soaker.last_task = time.monotonic(), None
        try:
            outcome, detail = KINDS[kind][0](soaker)
        except (httpx.HTTPError, OSError, TimeoutError) as error:
            outcome, detail = "lost", f"{type(error).__name__}: {error}"[:200]
        except Exception as error:  # an exception of the client library: no answer and no error from the app
            outcome, detail = "lost", f"{type(error).__name__}: {error}"[:200]
        with lock:
            records.append({"client": index, "kind": kind, "task": soaker.last_task, "outcome": outcome,
                            "detail": detail,
                            "t_s": round(started - args.t0, 1), "latency_s": round(time.monotonic() - started, 2)})
        time.sleep(rng.uniform(*args.pause))
    shutil.rmtree(downloads, ignore_errors=True)


def sample_rss(pid: int, stop: threading.Event, every: float, samples: list, t0: float) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append((round(time.monotonic() - t0, 1), process.memory_info().rss))
        except psutil.NoSuchProcess:
            return
        stop.wait(every)


def rss_summary(samples: list[tuple[float, int]], warmup_s: float, end_s: float) -> dict:
    """Baseline: median of the minute after the warm-up; final: median of the last minute; growth between."""
    baseline = [rss for t, rss in samples if warmup_s <= t < warmup_s + 60]
    final = [rss for t, rss in samples if t >= end_s - 60]
    after = [(t, rss) for t, rss in samples if t >= warmup_s]
    if not baseline or not final:
        return {"error": "too few samples after the warm-up"}
    base, last = statistics.median(baseline), statistics.median(final)
    slope = (statistics.linear_regression([t for t, _ in after], [rss for _, rss in after]).slope
             if len(after) > 2 else 0)
    return {"baseline_mb": round(base / 1e6, 1), "final_mb": round(last / 1e6, 1),
            "growth_pct": round(100 * (last - base) / base, 2),
            "peak_after_warmup_mb": round(max(rss for _, rss in after) / 1e6, 1),
            "first_sample_mb": round(samples[0][1] / 1e6, 1),
            "slope_after_warmup_mb_per_min": round(slope * 60 / 1e6, 2)}


def warmup_end(records: list[dict], minimum_s: float) -> float:
    """``minimum_s``, or later if not every tab has answered a valid request by then (its model loads on first use)."""
    first_ok: dict[str, float] = {}
    for record in records:
        if record["kind"] == "valid" and record["outcome"] == "ok":
            done = record["t_s"] + record["latency_s"]
            first_ok[record["task"]] = min(first_ok.get(record["task"], math.inf), done)
    return max([minimum_s, *first_ok.values()])


def summarise(records: list[dict], samples: list, args: argparse.Namespace, end_s: float, alive: bool) -> dict:
    warmup_s = warmup_end(records, args.warmup)
    by_kind = {kind: dict(Counter(r["outcome"] for r in records if r["kind"] == kind)) for kind in KINDS}
    unexpected = [r for r in records
                  if r["outcome"] not in ("lost", "unreadable") and r["outcome"] != EXPECTED.get(r["kind"], "error")]
    latencies = [r["latency_s"] for r in records if r["kind"] == "valid" and r["outcome"] == "ok"]
    return {
        "benchmark": "soak", "command": command_line(None), "commit": args.commit,
        "host": "127.0.0.1 (loopback only)",
        "preset": "tiny", "clients": args.clients, "duration_min": round(end_s / 60, 1),
        "pause_between_requests_s": list(args.pause), "request_timeout_s": args.timeout,
        "note": ("Shared 2-core CPU machine (run under nice -n 19 next to other work; load average below): each "
                 "client pauses between requests, so the rate is low on purpose; the point is many mixed requests "
                 "over a long time. gradio_client's HTTP timeout is set to the request timeout (its 5 s default "
                 "dropped jobs whose queue join a starved server acknowledged later: soak_cpu_run1.json)."),
        "load_average_1_5_15": [round(load, 1) for load in os.getloadavg()],
        "requests": len(records), "requests_per_min": round(len(records) / max(end_s / 60, 1e-9), 1),
        "lost": sum(r["outcome"] == "lost" for r in records),
        "unreadable_outputs": sum(r["outcome"] == "unreadable" for r in records),
        "unexpected_outcomes": len(unexpected), "server_alive_at_end": alive,
        "by_kind": by_kind,
        "valid_latency_s": {"median": round(statistics.median(latencies), 2) if latencies else None,
                            "max": max(latencies, default=None)},
        "rss": {"warmup_s": round(warmup_s, 1), "sample_every_s": args.sample,
                "method": "server process RSS (psutil); warm-up = --warmup s or until every tab has answered a "
                          "valid request, whichever is later; growth = median of the last 60 s over the median of "
                          "the 60 s after the warm-up", **rss_summary(samples, warmup_s, end_s)},
        "lost_requests": [r for r in records if r["outcome"] == "lost"][:50],
        "unreadable": [r for r in records if r["outcome"] == "unreadable"][:50],
        "unexpected": unexpected[:50],
        "error_messages": sorted({f'{r["kind"]}: {r["detail"][:100]}'
                                  for r in records if r["outcome"] == "error"})[:40],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds before the RSS baseline")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take before it is lost")
    parser.add_argument("--pause", type=float, nargs=2, default=(5.0, 20.0), help="min and max pause between requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip()
    process, url = start_app_process()
    args.t0 = time.monotonic()
    deadline = args.t0 + args.minutes * 60
    records, samples, lock, stop = [], [], threading.Lock(), threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(process.pid, stop, args.sample, samples, args.t0), daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client_loop, args=(i, url, deadline, args, records, lock), daemon=True)
               for i in range(args.clients)]
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=max(0.0, deadline - time.monotonic()) + args.timeout + 60)
        end_s = time.monotonic() - args.t0
        stop.set()
        alive = process.poll() is None
    finally:
        stop_process(process)
    report = summarise(records, samples, args, end_s, alive)
    report["clients_still_running"] = sum(client.is_alive() for client in clients)
    write_report(report, args.json)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))
    return report


if __name__ == "__main__":
    main()
