"""Share-link security: auth on UI and API, no error details on shared apps, files limited to the output dir,
no remote code, upload size limits."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from app import MAX_UPLOAD_SIZE, SHARE_WITHOUT_AUTH_WARNING, launch_options, parse_args
from quality_support import (
    REPO, client_for, free_port, registered_tasks, shared_app, start_app_process, stop_process,
)


@pytest.mark.slow
def test_share_without_auth_prints_a_warning_at_startup():
    command = [sys.executable, "app.py", "--preset", "tiny", "--share", "--port", str(free_port())]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "without --auth" not in seen:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen += line
        assert SHARE_WITHOUT_AUTH_WARNING.split(" makes")[0] in seen, seen[-2000:]
    finally:
        stop_process(process)


def test_error_details_are_hidden_on_shared_apps_and_uploads_are_capped():
    shared = launch_options(parse_args(["--share", "--auth", "u:p"]))
    local = launch_options(parse_args([]))
    assert shared["show_error"] is False and local["show_error"] is True
    assert shared["auth"] == ("u", "p")
    assert shared["max_file_size"] == local["max_file_size"] == MAX_UPLOAD_SIZE


@pytest.fixture(scope="module")
def auth_app():
    """The CLI app with --auth, in a subprocess."""
    process, url = start_app_process("--auth", "alice:s3cret-pass")
    yield url
    stop_process(process)


@pytest.mark.slow
def test_auth_refuses_unauthenticated_ui_and_api(auth_app):
    from gradio_client import Client

    task = registered_tasks()[0]
    page = httpx.get(auth_app, timeout=30).text
    config = json.loads(re.search(r"window\.gradio_config = (\{.*?\});</script>", page).group(1))
    assert config["auth_required"] is True and config["components"] == [] and config["dependencies"] == [], (
        "the UI is served without logging in")
    assert httpx.get(f"{auth_app}config", timeout=30).status_code in (401, 403)
    assert httpx.get(f"{auth_app}gradio_api/info", timeout=30).status_code in (401, 403)
    raw = httpx.post(f"{auth_app}gradio_api/call/generate_{task}", json={"data": ["hi"]}, timeout=30)
    assert raw.status_code in (401, 403), f"raw API call without credentials answered {raw.status_code}"
    with pytest.raises(Exception):
        Client(auth_app, verbose=False)
    with pytest.raises(Exception):
        Client(auth_app, verbose=False, auth=("alice", "wrong-pass"))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="gradio 6.31 embeds the API schema (window.gradio_api_info) in the login "
                   "page although /gradio_api/info requires login; upstream, nothing callable leaks")
def test_login_page_does_not_describe_the_api(auth_app):
    assert "named_endpoints" not in httpx.get(auth_app, timeout=30).text


@pytest.mark.slow
def test_auth_admits_the_right_credentials(auth_app):
    client = client_for(auth_app, auth=("alice", "s3cret-pass"))
    text, stats = client.predict("hello", "", "", "vanilla", 3, 0.0, 1.0, 1, api_name="/generate_text")
    assert stats["tokens"] >= 1
    login = httpx.post(f"{auth_app}login", data={"username": "alice", "password": "s3cret-pass"}, timeout=30)
    assert login.status_code == 200
    assert "generate_text" in httpx.get(f"{auth_app}config", cookies=login.cookies, timeout=30).text


@pytest.mark.parametrize("path", [
    "/etc/passwd", "../../../../../../etc/passwd", "%2Fetc%2Fpasswd", str(REPO / "app.py"), "app.py",
    str(REPO / ".git" / "config"), str(REPO / "tests" / "data" / "bad_inputs.json"),
])
def test_served_files_are_limited_to_the_output_dir(path):
    base = shared_app().url.rstrip("/")
    response = httpx.get(f"{base}/gradio_api/file={path}", timeout=30)
    assert response.status_code in (403, 404), f"{path} was served ({response.status_code})"
    assert "root:" not in response.text and "import" not in response.text


def test_files_in_the_output_dir_are_served():
    from pipelines.outputs import output_dir

    probe = output_dir() / "quality-gate-probe.txt"
    probe.write_text("served")
    base = shared_app().url.rstrip("/")
    assert httpx.get(f"{base}/gradio_api/file={probe}", timeout=30).text == "served"


def test_oversize_upload_is_refused_and_the_server_keeps_serving():
    base = shared_app().url.rstrip("/")
    limit = int(re.match(r"(\d+)mb", MAX_UPLOAD_SIZE).group(1)) * 1_000_000
    big = b"\0" * (limit + 2_000_000)
    refused = httpx.post(f"{base}/gradio_api/upload", files={"files": ("big.png", big)}, timeout=60)
    assert refused.status_code == 413, f"an upload over {MAX_UPLOAD_SIZE} got {refused.status_code}"
    small = httpx.post(f"{base}/gradio_api/upload", files={"files": ("small.png", b"\x89PNG")}, timeout=60)
    assert small.status_code == 200
    client = client_for(shared_app().url)
    assert client.predict("ok", "", "", "vanilla", 2, 0.0, 1.0, 1, api_name="/generate_text")[1]["tokens"] >= 1


def test_no_code_path_enables_remote_code():
    offenders = []
    for path in [REPO / "app.py", *REPO.glob("pipelines/**/*.py"), *REPO.glob("components/**/*.py"),
                 *REPO.glob("benchmarks/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*(?!False\b)", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "remote code must never be enabled:\n" + "\n".join(offenders)


@pytest.mark.slow
@pytest.mark.parametrize("method,route", [
    ("get", "gradio_api/app_id"), ("get", "gradio_api/token"),
    ("get", "gradio_api/user"), ("get", "gradio_api/heartbeat/someone-else"), ("post", "gradio_api/cancel"),
    ("post", "gradio_api/reset"), ("get", "gradio_api/runs"), ("post", "gradio_api/stream/some-event"),
    ("post", "gradio_api/stream/some-event/close"), ("get", "gradio_api/stream/someone/run/1/playlist.m3u8"),
])
def test_session_routes_refuse_callers_without_a_login(auth_app, method, route):
    anonymous = httpx.request(method, f"{auth_app}{route}", json={"session_hash": "x", "fn_index": 0,
                                                                  "event_id": "x"}, timeout=30)
    assert anonymous.status_code == 401, f"{route} answered {anonymous.status_code} without a login"
    wrong = httpx.post(f"{auth_app}login", data={"username": "alice", "password": "wrong"}, timeout=30)
    with_wrong_login = httpx.request(method, f"{auth_app}{route}", cookies=wrong.cookies, timeout=30)
    assert with_wrong_login.status_code == 401, f"{route} answered {with_wrong_login.status_code} to a wrong login"


def test_a_request_body_over_the_total_limit_is_refused_before_it_is_read():
    from request_guard import MAX_REQUEST_BYTES

    base = shared_app().url.rstrip("/")
    files = [("files", (f"part{i}.png", b"\0" * 20_000_000)) for i in range(2)]
    refused = httpx.post(f"{base}/gradio_api/upload", files=files, timeout=60)
    assert refused.status_code == 413, f"{2 * 20_000_000} bytes over {MAX_REQUEST_BYTES} got {refused.status_code}"


@pytest.mark.slow
def test_startup_events_route_is_harmless_without_a_login(auth_app):
    """launch() calls it itself; a second call does nothing and reveals no state."""
    first = httpx.get(f"{auth_app}gradio_api/startup-events", timeout=30)
    again = httpx.get(f"{auth_app}gradio_api/startup-events", timeout=30)
    assert first.status_code == again.status_code == 200 and again.json() is False


def output_probe() -> str:
    from pipelines.outputs import output_dir

    probe = output_dir() / "auth-gate-probe.txt"
    probe.write_text("another user's output")
    return str(probe)


# Routes that read or change queue state, files and uploads; Gradio checks the login on these itself.
# (method, route, request keyword arguments); the route is formatted with the path of a file in the output dir.
LOGIN_CHECKED_ROUTES = [
    ("get", "gradio_api/queue/data?session_hash=someone", {}),
    ("post", "gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "someone"}}),
    ("get", "gradio_api/queue/status", {}),
    ("get", "gradio_api/call/generate_text/some-event", {}),
    ("get", "gradio_api/file={probe}", {}),
    ("post", "gradio_api/upload", {"files": {"files": ("a.txt", b"x")}}),
    ("get", "gradio_api/upload_progress?upload_id=someone", {}),
    ("post", "gradio_api/component_server", {"json": {"component_id": 1, "fn_name": "x", "data": None,
                                                      "session_hash": "someone"}}),
    ("post", "gradio_api/process_recording", {}),
    ("get", "gradio_api/run-history/records", {}),
    ("get", "monitoring", {}),
]


def status_of(method: str, url: str, cookies=None, **kwargs) -> int:
    """The status line only: some routes answer an endless event stream once admitted."""
    with httpx.stream(method, url, cookies=cookies, timeout=30, **kwargs) as response:
        return response.status_code


@pytest.mark.slow
@pytest.mark.parametrize("method,route,kwargs", LOGIN_CHECKED_ROUTES, ids=[r[1].split("?")[0] for r in
                                                                           LOGIN_CHECKED_ROUTES])
def test_queue_file_and_upload_routes_refuse_callers_without_a_login(auth_app, method, route, kwargs):
    url = auth_app + route.format(probe=output_probe())
    assert status_of(method, url, **kwargs) == 401, f"{route} answered without a login"
    wrong = httpx.post(f"{auth_app}login", data={"username": "alice", "password": "wrong"}, timeout=30)
    assert status_of(method, url, cookies=wrong.cookies, **kwargs) == 401, f"{route} answered a wrong login"


@pytest.mark.slow
def test_the_login_opens_the_file_queue_and_upload_routes(auth_app):
    """The other side of the gate above: the same requests pass with the right login."""
    login = httpx.post(f"{auth_app}login", data={"username": "alice", "password": "s3cret-pass"}, timeout=30)
    probe = output_probe()
    assert httpx.get(f"{auth_app}gradio_api/file={probe}", cookies=login.cookies, timeout=30).text == (
        "another user's output")
    for method, route, kwargs in LOGIN_CHECKED_ROUTES[:3] + LOGIN_CHECKED_ROUTES[5:6]:
        assert status_of(method, auth_app + route, cookies=login.cookies, **kwargs) == 200, route


@pytest.mark.slow
@pytest.mark.parametrize("method,route", [
    ("get", "gradio_api/vibe-code"), ("get", "gradio_api/monitoring/some-key"), ("get", "gradio_api/profiling/traces"),
])
def test_developer_routes_are_off_for_everyone(auth_app, method, route):
    """Vibe editing, monitoring and profiling are off in Tokenworks: refused with or without a login."""
    login = httpx.post(f"{auth_app}login", data={"username": "alice", "password": "s3cret-pass"}, timeout=30)
    for cookies in (None, login.cookies):
        assert status_of(method, auth_app + route, cookies=cookies) in (403, 404), route
