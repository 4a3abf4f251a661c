"""Tokenworks: a Gradio studio for fast decoding and token-level control of generative models.

python app.py [--preset auto|tiny] [--host H] [--port P] [--share] [--auth USER:PASS]
Every flag also reads an environment variable (TOKENWORKS_PRESET, _HOST, _PORT, _SHARE, _AUTH).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

import gradio as gr
from starlette.middleware import Middleware

from components import TAB_BUILDERS
from components.common import explain_unreadable_inputs, give_text_inputs_api_defaults
from pipelines import settings
from pipelines.outputs import output_dir
from pipelines.presets import PRESETS
from pipelines.registry import build_registry
from request_guard import UPLOAD_TTL_S, RequestGuard

QUEUE_MAX_SIZE = 32
MAX_UPLOAD_SIZE = "25mb"
# Gradio deletes its temp files (uploads, cached outputs) older than UPLOAD_TTL_S, looking every TEMP_SWEEP_S.
TEMP_SWEEP_S = 300
SHARE_WITHOUT_AUTH_WARNING = (
    "Warning: --share without --auth makes this app (and your GPU) reachable by anyone with the link for a week. "
    "Add --auth USER:PASS."
)


def build_demo(registry: dict) -> gr.Blocks:
    """The whole UI for the pipelines in ``registry`` (one tab each), without launching it."""
    with gr.Blocks(title="Tokenworks", delete_cache=(TEMP_SWEEP_S, UPLOAD_TTL_S)) as demo:
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


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must look like USER:PASS")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tokenworks studio")
    parser.add_argument("--preset", choices=PRESETS, default=settings.preset())
    parser.add_argument("--host", default=settings.host())
    parser.add_argument("--port", type=int, default=settings.port())
    parser.add_argument("--share", action="store_true", default=settings.share())
    parser.add_argument("--auth", default=settings.auth(), help="USER:PASS required for the UI and API")
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
