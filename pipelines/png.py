"""PNG writing that keeps up with the GPU: rows "Up"-filtered with numpy, deflated in parallel slices.

Why: PIL encodes PNG on one core with per-row adaptive filtering; at 1024 px that took 0.19 s on the H100 host
(0.46 s here for a noisy image) after a 1.5 s generation — a tenth of what the user waits for. zlib releases the
GIL, so slices of the filtered rows are deflated on worker threads and joined into one zlib stream (each slice
ends on a byte boundary with a sync flush, the way pigz does it); the Adler-32 of the whole stream is combined
on the host. The file is an ordinary PNG: PIL, browsers and A1111-style readers open it unchanged."""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
FILTER_UP = 2
WORKERS = min(8, os.cpu_count() or 1)
MIN_SLICE_BYTES = 1 << 18  # below this a slice costs more in thread hand-off than it saves


@lru_cache(maxsize=1)
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="png")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    """iTXt (UTF-8), so prompts in any script survive; PIL reads it into ``image.text``."""
    return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """Each row prefixed by filter type Up (2): the byte minus the one above, mod 256 (row 0 is unchanged)."""
    height = pixels.shape[0]
    flat = pixels.reshape(height, -1)
    rows = np.empty((height, flat.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = FILTER_UP
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    return rows


def _deflate(part: memoryview, level: int, last: bool) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(part) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def zlib_stream(data: np.ndarray, level: int = 1) -> bytes:
    """One zlib stream of a uint8 array's bytes, its slices deflated in parallel (raw deflate, sync-flushed)."""
    view = memoryview(np.ascontiguousarray(data).reshape(-1))
    slices = max(1, min(WORKERS, len(view) // MIN_SLICE_BYTES))
    step = -(-len(view) // slices)
    bounds = [(i, min(i + step, len(view))) for i in range(0, len(view), step)] or [(0, 0)]
    jobs = [(view[a:b], level, n == len(bounds) - 1) for n, (a, b) in enumerate(bounds)]
    parts = list(_workers().map(lambda job: _deflate(*job), jobs)) if len(jobs) > 1 else [_deflate(*jobs[0])]
    return b"\x78\x01" + b"".join(parts) + struct.pack(">I", zlib.adler32(view))


def png_bytes(image: Any, text: dict[str, str], level: int = 1) -> bytes:
    """The PNG file of a PIL image (L, RGB or RGBA; others are converted to RGB) with text chunks."""
    if image.mode not in COLOUR_TYPES:
        image = image.convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[image.mode], 0, 0, 0)
    body = zlib_stream(filtered_rows(pixels), level)
    return b"".join([SIGNATURE, _chunk(b"IHDR", header), *(_text_chunk(k, v) for k, v in text.items()),
                     _chunk(b"IDAT", body), _chunk(b"IEND", b"")])
