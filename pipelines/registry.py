"""Which tabs exist: one pipeline per task, built for a preset. A tab appears only when its pipeline does."""
from __future__ import annotations

from importlib import import_module

from .base import Pipeline
from .models import ModelStore

TASK_ORDER = ("text", "image", "video", "speech", "song")
# Each task's pipeline class in ``pipelines/tabs/<task>.py``, imported when the registry is built (not when this
# module is), so importing the registry does not load every tab's model libraries.
PIPELINE_CLASSES = {"text": "TextPipeline", "image": "ImagePipeline", "video": "VideoPipeline",
                    "speech": "SpeechPipeline", "song": "SongPipeline"}


def build_registry(preset: str = "auto", store: ModelStore | None = None) -> dict[str, Pipeline]:
    """Pipelines by task, in tab order; they share one ModelStore so the memory budget is global."""
    store = store or ModelStore()
    return {task: getattr(import_module(f".tabs.{task}", __package__), PIPELINE_CLASSES[task])(store, preset)
            for task in TASK_ORDER}
