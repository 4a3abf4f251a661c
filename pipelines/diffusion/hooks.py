"""The registry of UNet forward pre-hooks that are safe to capture (diffusion/fast.py), and taking a module's pre-hooks
off and back.

``FastUNet`` runs the UNet's pre-hooks inside the captured region, on the static inputs, and shares a captured
graph across requests. That is right only for a hook that reads the call's own tensors and shapes and Python
state fixed for the run, never a per-request tensor by address and never the device from the host (a sync would
abort a capture). A hook says so where it is defined, ``@capture_safe("name")`` on its function or method: the
registry ``CAPTURE_SAFE`` maps the hook's code to that name (every closure or bound method of one definition is
the same hook), and the name is the hook's part of a graph's cache key. Any other hook keeps the fast path, but
its graphs live for one run only.
"""
from __future__ import annotations

from collections import OrderedDict
from types import CodeType
from typing import Callable, TypeVar

from torch import nn

Hook = TypeVar("Hook", bound=Callable)

# code of a registered hook -> its name (one entry per hook definition)
CAPTURE_SAFE: dict[CodeType, str] = {}


def _code(hook: Callable) -> CodeType | None:
    return getattr(getattr(hook, "__func__", hook), "__code__", None)


def capture_safe(name: str) -> Callable[[Hook], Hook]:
    """Decorator: register the hook it decorates (a function, or a method) as safe to capture, under ``name``."""
    def register(hook: Hook) -> Hook:
        code = _code(hook)
        if code is None:
            raise TypeError(f"capture_safe registers functions and methods, not {type(hook).__name__}.")
        taken = [c for c, n in CAPTURE_SAFE.items() if n == name and c is not code]
        if taken:
            raise ValueError(f"A capture-safe hook named {name!r} is already registered.")
        CAPTURE_SAFE[code] = name
        return hook
    return register


def capture_name(hook: Callable) -> str | None:
    """The name ``hook`` was registered under with ``capture_safe`` (a bound method counts as its function);
    None when it was not."""
    code = _code(hook)
    return CAPTURE_SAFE.get(code) if code is not None else None


def take_pre_hooks(module: nn.Module) -> tuple[OrderedDict, dict]:
    """Take every forward pre-hook off ``module``: ``(hooks by id, with-kwargs flags by id)``, for ``put_pre_hooks``.

    torch has no public API to list or detach a module's hooks; its two private dicts are read here only."""
    taken = (OrderedDict(module._forward_pre_hooks), dict(module._forward_pre_hooks_with_kwargs))
    module._forward_pre_hooks.clear()
    module._forward_pre_hooks_with_kwargs.clear()
    return taken


def put_pre_hooks(module: nn.Module, taken: tuple[OrderedDict, dict]) -> None:
    """Put back what ``take_pre_hooks`` took (hooks registered meanwhile stay, and run first)."""
    module._forward_pre_hooks.update(taken[0])
    module._forward_pre_hooks_with_kwargs.update(taken[1])
