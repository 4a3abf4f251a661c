"""ASGI middleware that bounds what one caller may send, and what it may reach behind --auth without a login.

Gradio's own limits are per file (``max_file_size``) and it leaves some session routes open (issue 25), so the
guard sits in front of every HTTP request: bodies are counted whether their size is declared or streamed
(chunked), uploads are charged to the caller's session, and session routes need the login cookie.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Callable

from python_multipart.exceptions import MultipartParseError
from starlette.responses import JSONResponse

# Whole request body (all files and text together): Gradio's max_file_size is per file (issue 25: 10 x 24 MB passed).
MAX_REQUEST_BYTES = 30_000_000
# Bodies that carry no files (the JSON of API calls and queue joins: text inputs of at most MAX_TEXT_CHARS each,
# file references, numbers): refused past this before Gradio parses them, so a 30 MB prompt costs no JSON parse.
MAX_FORMLESS_BYTES = 2_000_000
# Uploads one session may hold in Gradio's temp folder; upload temp files are deleted UPLOAD_TTL_S after they were
# written (Blocks.delete_cache), so bytes are charged for that long.
MAX_SESSION_UPLOAD_BYTES = 100_000_000
UPLOAD_TTL_S = 3600
UPLOAD_ROUTE = "/gradio_api/upload"
# Routes Gradio serves without its login check; behind --auth they need a session (issue 25). Left open:
# /gradio_api/startup-events, which launch() itself calls and which only runs the startup events once.
# /gradio_api/stream/ would let a caller push input into, or read the media of, another user's event.
SESSION_ROUTES = ("/gradio_api/app_id", "/gradio_api/token", "/gradio_api/user",
                  "/gradio_api/heartbeat", "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/runs",
                  "/gradio_api/stream/")


class BodyTooLarge(MultipartParseError):
    """Raised to the app from ``receive`` once a streamed body passes its cap. A MultipartParseError because that
    is the error on which Gradio's upload parser deletes the temp files it has already written."""


class UploadLedger:
    """Bytes each session uploaded within the last ``ttl_s`` seconds, plus the bytes of uploads in flight."""

    def __init__(self, limit: int = MAX_SESSION_UPLOAD_BYTES, ttl_s: float = UPLOAD_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.ttl_s, self.clock = limit, ttl_s, clock
        self.kept: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.in_flight: dict[str, int] = defaultdict(int)

    def used(self, session: str) -> int:
        kept = self.kept.get(session, ())
        while kept and kept[0][0] < self.clock() - self.ttl_s:
            kept.popleft()
        return sum(size for _, size in kept) + self.in_flight.get(session, 0)

    def remaining(self, session: str) -> int:
        return max(0, self.limit - self.used(session))

    def receive(self, session: str, size: int) -> None:
        self.in_flight[session] += size

    def settle(self, session: str, size: int, kept: bool) -> None:
        """An upload of ``size`` bytes ended; ``kept``: Gradio accepted its files (they stay until the TTL)."""
        self.in_flight[session] -= size
        if not self.in_flight[session]:
            del self.in_flight[session]
        if kept and size:
            self.kept[session].append((self.clock(), size))
        self.used(session)  # drops what expired
        if not self.kept.get(session, True):
            del self.kept[session]

    def sessions(self) -> int:
        """How many sessions the ledger remembers (ones with nothing kept or in flight are forgotten)."""
        return len(self.kept.keys() | self.in_flight.keys())


class RequestGuard:
    """Refuse (413) multipart bodies over MAX_REQUEST_BYTES, other bodies over MAX_FORMLESS_BYTES, and uploads over
    the session's remaining budget: by the declared Content-Length before reading, else as soon as the streamed
    body passes the cap. With auth on, refuse (401) the session routes to callers without a login cookie."""

    def __init__(self, app, auth_required: bool = False, ledger: UploadLedger | None = None) -> None:
        self.app, self.auth_required = app, auth_required
        self.ledger = ledger if ledger is not None else UploadLedger()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.auth_required and scope["path"].startswith(SESSION_ROUTES) and not _login_token(scope, headers):
            return await JSONResponse({"error": "Not authenticated"}, status_code=401)(scope, receive, send)
        is_upload = scope["path"].rstrip("/") == UPLOAD_ROUTE
        session = session_key(scope, headers)
        limit = min(body_limit(headers), self.ledger.remaining(session)) if is_upload else body_limit(headers)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await too_large(limit, is_upload)(scope, receive, send)
        await self._forward_counted(scope, receive, send, limit, session if is_upload else None)

    async def _forward_counted(self, scope, receive, send, limit: int, upload_session: str | None) -> None:
        """Pass the request on, counting its body; past ``limit``, stop the app reading and answer 413 once it has
        unwound (Gradio deletes a refused upload's partial files on the way out)."""
        received, state = 0, {"refused": False, "status": 0}

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            size = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            received += size
            if upload_session is not None:
                self.ledger.receive(upload_session, size)
            if received > limit:
                state["refused"] = True
                raise BodyTooLarge(f"Request body over {limit:,} bytes")
            return message

        async def guarded_send(message: dict) -> None:
            if state["refused"]:
                return
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
        finally:
            if upload_session is not None:
                kept = not state["refused"] and 200 <= state["status"] < 300
                self.ledger.settle(upload_session, received, kept)
        if state["refused"] and not state["status"]:
            await too_large(limit, upload_session is not None)(scope, receive, send)


def body_limit(headers: dict) -> int:
    """MAX_REQUEST_BYTES for multipart bodies (files), MAX_FORMLESS_BYTES for everything else."""
    is_form = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
    return MAX_REQUEST_BYTES if is_form else MAX_FORMLESS_BYTES


def too_large(limit: int, is_upload: bool) -> JSONResponse:
    refused = "This upload" if is_upload else "This request"
    return JSONResponse({"error": f"{refused} is over {limit:,} bytes. Uploads are limited to {MAX_REQUEST_BYTES:,} "
                                  f"bytes per request and {MAX_SESSION_UPLOAD_BYTES:,} bytes per session every "
                                  f"{UPLOAD_TTL_S // 60} minutes, other requests to {MAX_FORMLESS_BYTES:,} bytes."},
                        status_code=413)


def session_key(scope: dict, headers: dict) -> str:
    """The caller's login token when it has a valid one, else its address (anonymous callers of a share link all
    arrive through the tunnel from loopback, so they share one budget; a made-up cookie gets no budget of its own)."""
    token = _login_token(scope, headers)
    if token:
        return f"login:{token}"
    client = scope.get("client") or ("unknown", 0)
    return f"address:{client[0]}"


def _login_token(scope: dict, headers: dict) -> str | None:
    """The value of an access-token cookie that Gradio issued at login, if the caller sent one."""
    tokens = getattr(scope.get("app"), "tokens", {}) or {}
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name.startswith("access-token") and value in tokens:
            return value
    return None
