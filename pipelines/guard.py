"""Turn the failures a user can hit into PipelineErrors, and recover memory after an out-of-memory."""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from .base import Cancelled, Event, Pipeline, PipelineError, Request
from .models import ModelStore

log = logging.getLogger("tokenworks")

OOM_MESSAGE = (
    "Out of memory while generating. Tokenworks unloaded its models to free memory; try again with a smaller "
    "size, fewer frames/steps or a smaller model."
)


def guarded_events(pipeline: Pipeline, request: Request, store: ModelStore) -> Iterator[Event]:
    """Run ``pipeline.generate``; OOM frees the store and becomes a clear error; Stop ends quietly."""
    events = pipeline.generate(request)
    try:
        yield from events
    except Cancelled:
        return
    except torch.OutOfMemoryError:
        store.unload_all()
        raise PipelineError(OOM_MESSAGE) from None
    except PipelineError:
        raise
    except Exception as error:  # an unexpected bug: log the trace here, show the user one line
        log.exception("pipeline %s failed", type(pipeline).__name__)
        raise PipelineError(f"{type(pipeline).__name__} failed: {type(error).__name__}: {error}") from error
    finally:
        events.close()
