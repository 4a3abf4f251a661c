"""Tokenworks: a Gradio studio for fast decoding and token-level control of generative models.

python app.py [--preset auto|tiny] [--host H] [--port P] [--share] [--auth USER:PASS]
Every flag also reads an environment variable (TOKENWORKS_PRESET, _HOST, _PORT, _SHARE, _AUTH).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import gradio as gr
from starlette.middleware import Middleware
from starlette.responses import JSONResponse

from components import TAB_BUILDERS
from components.common import explain_unreadable_inputs, give_text_inputs_api_defaults
from pipelines.outputs import output_dir
from pipelines.presets import PRESETS
from pipelines.registry import build_registry

QUEUE_MAX_SIZE = 32
MAX_UPLOAD_SIZE = "25mb"
# Whole request body (all files and text together): Gradio's max_file_size is per file (issue 25: 10 x 24 MB passed).
MAX_REQUEST_BYTES = 30_000_000
# Routes Gradio serves without its login check; behind --auth they need a session (issue 25). Left open:
# /gradio_api/startup-events, which launch() itself calls and which only runs the startup events once.
SESSION_ROUTES = ("/gradio_api/app_id", "/gradio_api/token", "/gradio_api/user",
                  "/gradio_api/heartbeat", "/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/runs")
SHARE_WITHOUT_AUTH_WARNING = (
    "Warning: --share without --auth makes this app (and your GPU) reachable by anyone with the link for a week. "
    "Add --auth USER:PASS."
)


def build_demo(registry: dict) -> gr.Blocks:
    """The whole UI for the pipelines in ``registry`` (one tab each), without launching it."""
    with gr.Blocks(title="Tokenworks") as demo:
        gr.Markdown("# Tokenworks\nFast decoding and token-level control of generative models, side by side.")
        with gr.Tabs():
            for task, pipeline in registry.items():
                label, build_tab = TAB_BUILDERS[task]
                with gr.Tab(label, id=task, elem_id=f"tab-{task}"):
                    build_tab(pipeline)
    explain_unreadable_inputs(demo)
    give_text_inputs_api_defaults(demo)
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=None)
    return demo


class RequestGuard:
    """ASGI middleware: refuse bodies over MAX_REQUEST_BYTES before they are read, and, with auth on, the
    session routes of callers without a login cookie."""

    def __init__(self, app, auth_required: bool = False) -> None:
        self.app, self.auth_required = app, auth_required

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            refusal = JSONResponse({"error": f"Request over {MAX_REQUEST_BYTES:,} bytes."}, status_code=413)
            return await refusal(scope, receive, send)
        if self.auth_required and scope["path"].startswith(SESSION_ROUTES) and not _logged_in(scope, headers):
            return await JSONResponse({"error": "Not authenticated"}, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def _logged_in(scope: dict, headers: dict) -> bool:
    app = scope.get("app")
    cookies = headers.get(b"cookie", b"").decode("latin-1")
    tokens = getattr(app, "tokens", {}) or {}
    for part in cookies.split(";"):
        name, _, value = part.strip().partition("=")
        if name.startswith("access-token") and value in tokens:
            return True
    return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must look like USER:PASS")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Tokenworks studio")
    parser.add_argument("--preset", choices=PRESETS, default=env("TOKENWORKS_PRESET", "auto"))
    parser.add_argument("--host", default=env("TOKENWORKS_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("TOKENWORKS_PORT", "7860")))
    parser.add_argument("--share", action="store_true", default=env("TOKENWORKS_SHARE", "") not in {"", "0"})
    parser.add_argument("--auth", default=env("TOKENWORKS_AUTH"), help="USER:PASS required for the UI and API")
    return parser.parse_args(argv)


def launch_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for ``demo.launch``: errors detailed only locally, files limited to the output dir."""
    auth = parse_auth(args.auth)
    if args.share and auth is None:
        warnings.warn(SHARE_WITHOUT_AUTH_WARNING, stacklevel=2)
        print(SHARE_WITHOUT_AUTH_WARNING, file=sys.stderr)
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        show_error=not args.share,
        allowed_paths=[str(output_dir())],
        max_file_size=MAX_UPLOAD_SIZE,
        css_paths=["assets/style.css"],
        app_kwargs={"middleware": [Middleware(RequestGuard, auth_required=auth is not None)]},
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    demo = build_demo(build_registry(args.preset))
    demo.launch(**launch_options(args))


if __name__ == "__main__":
    main()
