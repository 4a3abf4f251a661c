"""The registry of UNet forward pre-hooks that are safe to capture (image/fast.py).

``FastUNet`` runs the UNet's pre-hooks inside the captured region, on the static inputs, and shares a captured
graph across requests. That is right only for a hook that reads the call's own tensors and shapes and Python
state fixed for the run, never a per-request tensor by address and never the device from the host (a sync would
abort a capture). A hook says so by registering here (``capture_safe``) where it is defined; any other hook keeps
the fast path, but its graphs live for one run only.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

Hook = TypeVar("Hook", bound=Callable)

_SAFE: "weakref.WeakSet[Callable]" = weakref.WeakSet()


def capture_safe(hook: Hook) -> Hook:
    """Register ``hook`` (a function, or the function of a method) as safe to capture; returns it unchanged."""
    _SAFE.add(getattr(hook, "__func__", hook))
    return hook


def is_capture_safe(hook: Callable) -> bool:
    """Whether ``hook`` (a bound method counts as its function) was registered with ``capture_safe``."""
    return getattr(hook, "__func__", hook) in _SAFE
