"""Which tabs exist: one pipeline per task, built for a preset. A tab appears only when its pipeline does."""
from __future__ import annotations

from typing import Callable

from .base import Pipeline
from .models import ModelStore

TASK_ORDER = ("text", "image", "video", "speech", "song")


def _text(store: ModelStore, preset: str) -> Pipeline:
    from .tabs.text import TextPipeline

    return TextPipeline(store, preset)


def _image(store: ModelStore, preset: str) -> Pipeline:
    from .tabs.image import ImagePipeline

    return ImagePipeline(store, preset)


def _speech(store: ModelStore, preset: str) -> Pipeline:
    from .tabs.speech import SpeechPipeline

    return SpeechPipeline(store, preset)


def _video(store: ModelStore, preset: str) -> Pipeline:
    from .tabs.video import VideoPipeline

    return VideoPipeline(store, preset)


def _song(store: ModelStore, preset: str) -> Pipeline:
    from .tabs.song import SongPipeline

    return SongPipeline(store, preset)


PIPELINE_FACTORIES: dict[str, Callable[[ModelStore, str], Pipeline]] = {
    "text": _text,
    "image": _image,
    "video": _video,
    "speech": _speech,
    "song": _song,
}


def build_registry(preset: str = "auto", store: ModelStore | None = None) -> dict[str, Pipeline]:
    """Pipelines by task, in tab order; they share one ModelStore so the memory budget is global."""
    store = store or ModelStore()
    return {task: PIPELINE_FACTORIES[task](store, preset) for task in TASK_ORDER if task in PIPELINE_FACTORIES}
