"""Where results are saved, always with the parameters that reproduce them."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from . import settings


def output_dir() -> Path:
    directory = settings.output_dir().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def new_output_path(task: str, suffix: str) -> Path:
    """A fresh, unique file path under the output dir, grouped by task and day."""
    folder = output_dir() / task / time.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}{suffix}"


def write_sidecar(media_path: Path, parameters: dict[str, Any]) -> Path:
    """Write ``<media>.json`` next to an audio or video file with its generation parameters."""
    sidecar = media_path.with_suffix(media_path.suffix + ".json")
    sidecar.write_text(json.dumps(parameters, indent=2, default=str))
    return sidecar


def save_text(text: str, parameters: dict[str, Any]) -> tuple[Path, Path]:
    """Save generated text as UTF-8 ``.txt`` with a ``.txt.json`` sidecar holding its parameters and stats."""
    path = new_output_path("text", ".txt")
    path.write_text(text, encoding="utf-8")
    return path, write_sidecar(path, parameters)


def save_png(image, parameters: dict[str, Any], path: Path | None = None) -> Path:
    """Save a PIL image as PNG with its parameters as JSON in a ``parameters`` text chunk (``png.png_bytes``:
    deflated in parallel, so writing stays a small part of a request)."""
    from .png import png_bytes

    path = path or new_output_path("image", ".png")
    path.write_bytes(png_bytes(image, {"parameters": json.dumps(parameters, default=str)}))
    return path
