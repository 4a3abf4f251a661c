"""What the image techniques keep per UNet across requests, in one object kept on the UNet itself.

Token merging's installation (merging.py) and the fast path's captured graphs (fast.py) belong to one model: they
must be shared by every request on it (the image tab serves a shallow copy of the loaded pipeline per request,
same UNet) and go when the model is evicted. So they live in one ``UNetState``, created once per UNet by
``unet_state`` and kept in the UNet's single attribute ``tokenworks_state``; a loaded image model exposes it as
``LoadedImageModel.state``. A copy or pickle of the UNet starts empty: graphs and hooks are tied to the parameters
and modules of this one.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .fast import Entry
    from .merging import TokenMerging

# The one attribute this package sets on a library module.
ATTRIBUTE = "tokenworks_state"


@dataclass
class UNetGraphs:
    """One UNet's captured calls across requests: the cache entries and the memory pool their graphs share."""

    entries: "OrderedDict[Any, Entry]" = field(default_factory=OrderedDict)
    pool: Any = None
    failed: dict[Any, str] = field(default_factory=dict)  # ``captured`` work that would not capture: run eagerly


@dataclass
class UNetState:
    """Per-UNet state of the image techniques: what ``apply_merging`` installed (None: stock blocks) and the fast
    path's graphs (entries refer to their UNet's parameters only weakly; a ``compile`` entry's function holds its
    run and so the UNet: a reference cycle, freed with the UNet by the garbage collector)."""

    merging: "TokenMerging | None" = None
    graphs: UNetGraphs = field(default_factory=UNetGraphs)

    def __reduce__(self) -> tuple:
        """Copied or pickled with its UNet: start empty (graphs and hooks belong to the original's modules)."""
        return UNetState, ()


def unet_state(unet: "nn.Module") -> UNetState:
    """The state kept for ``unet``, created on first use."""
    state = vars(unet).get(ATTRIBUTE)
    if state is None:
        state = UNetState()
        setattr(unet, ATTRIBUTE, state)
    return state
