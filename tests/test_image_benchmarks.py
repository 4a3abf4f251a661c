"""The image benchmarks measure inference: no autograd graph kept in their timings or peak memory."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch


def test_image_speed_measures_every_size_without_autograd(monkeypatch):
    image_speed = importlib.import_module("benchmarks.image_speed")
    seen = []

    def eager_reference(*_args):
        seen.append(torch.is_grad_enabled())
        raise StopIteration  # the rest of measure_size is not needed to know the mode it runs in

    monkeypatch.setattr(image_speed, "eager_reference", eager_reference)
    monkeypatch.setattr(image_speed, "unet_inputs", lambda *_args: {})
    try:
        image_speed.measure_size(None, 64, [], SimpleNamespace(batch=2), "cpu", torch.float32)
    except StopIteration:
        pass
    assert seen == [False]
