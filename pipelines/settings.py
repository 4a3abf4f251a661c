"""Every environment variable Tokenworks reads, one accessor each (the README's "Settings" table lists them).

Read at call time, not import time, so a test's ``monkeypatch.setenv`` (or a benchmark's ``os.environ``) takes
effect. Values whose valid set belongs to a technique (the text compile mode, the image fast-path backend) are
checked where that set lives (``decoding.serving.compile_mode``, ``image.fast.choose_backend``). No torch here:
``app.py`` and ``components/`` import this module too.
"""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes"}


def preset() -> str:
    """``TOKENWORKS_PRESET``: the default of ``app.py --preset`` (default ``auto``)."""
    return os.environ.get("TOKENWORKS_PRESET", "auto")


def host() -> str:
    """``TOKENWORKS_HOST``: the default of ``app.py --host`` (default ``127.0.0.1``)."""
    return os.environ.get("TOKENWORKS_HOST", "127.0.0.1")


def port() -> int:
    """``TOKENWORKS_PORT``: the default of ``app.py --port`` (default 7860); not an integer raises ValueError."""
    return int(os.environ.get("TOKENWORKS_PORT", "7860"))


def share() -> bool:
    """``TOKENWORKS_SHARE``: the default of ``app.py --share``; any value but empty or ``0`` is on (default off)."""
    return os.environ.get("TOKENWORKS_SHARE", "") not in {"", "0"}


def auth() -> str | None:
    """``TOKENWORKS_AUTH``: the default of ``app.py --auth``, ``USER:PASS`` (default None: no login)."""
    return os.environ.get("TOKENWORKS_AUTH")


def output_dir() -> Path:
    """``TOKENWORKS_OUTPUT_DIR``: where results are saved with their parameters (default ``outputs``)."""
    return Path(os.environ.get("TOKENWORKS_OUTPUT_DIR", "outputs"))


def cache_dir() -> Path:
    """``TOKENWORKS_CACHE``: converted packaged weights, trained heads, step costs (default ``~/.cache/tokenworks``)."""
    return Path(os.environ.get("TOKENWORKS_CACHE", Path.home() / ".cache" / "tokenworks"))


def memory_budget_gb() -> float | None:
    """``TOKENWORKS_MEMORY_BUDGET_GB``: the model memory budget in GiB (default None: 85 % of GPU memory or half
    of RAM); not a number raises ValueError."""
    value = os.environ.get("TOKENWORKS_MEMORY_BUDGET_GB")
    return float(value) if value else None


def text_fast() -> str:
    """``TOKENWORKS_TEXT_FAST``: the text static-cache path, ``auto`` (CUDA only), ``1`` (also CPU) or ``0``
    (default ``auto``)."""
    return os.environ.get("TOKENWORKS_TEXT_FAST", "auto")


def text_compile() -> str:
    """``TOKENWORKS_TEXT_COMPILE``: how the text step compiles, ``auto``, ``0`` or a mode of
    ``decoding.static.COMPILE_MODES``, checked by ``decoding.serving.compile_mode`` (default ``auto``)."""
    return os.environ.get("TOKENWORKS_TEXT_COMPILE", "auto")


def fast_backend() -> str:
    """``TOKENWORKS_FAST_BACKEND``: the image/video UNet backend on CUDA, one of ``diffusion.fast.BACKENDS``;
    ``choose_backend`` turns an unknown value into ``graph`` (default ``graph``)."""
    return os.environ.get("TOKENWORKS_FAST_BACKEND", "graph")


def zero_gpu() -> bool:
    """``SPACES_ZERO_GPU`` (set by Hugging Face ZeroGPU Spaces): any non-empty value means the GPU is attached per
    call, so no CUDA graphs or ``torch.compile`` and GPU handlers get ``@spaces.GPU`` (default off)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (huggingface_hub's own switch): ``1``/``true``/``yes`` skips our Hub reachability probe
    (default off)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in _TRUE
