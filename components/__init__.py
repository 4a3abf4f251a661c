"""Gradio UI only: one module per tab plus shared widgets. Never imports torch."""
from __future__ import annotations

from typing import Callable

from . import image_tab, song_tab, speech_tab, text_tab, video_tab

TAB_BUILDERS: dict[str, tuple[str, Callable]] = {
    "text": ("Text", text_tab.build),
    "image": ("Image", image_tab.build),
    "video": ("Video", video_tab.build),
    "speech": ("Speech", speech_tab.build),
    "song": ("Song", song_tab.build),
}
