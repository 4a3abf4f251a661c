"""Classical scorer for micro-world v2 images, with a precision term and an image-validity check.

v1's scorer (``scorer.py``) rewards noise: it counts every asked object it can match and ignores what else is
there, so smooth random noise scored presence 0.875 (issue 22). Here:
- An image is *valid* only if most of it is the plain ground (``MIN_BACKGROUND`` of the pixels within
  ``GROUND_TOLERANCE`` of the ground colour; v2 scenes keep >= ~60 %) and it holds at most ``MAX_DETECTIONS``
  objects (scenes have <= 3; random coloured blobs on the ground fit shapes as well as generated objects do, IoU
  ~0.8, so clutter is refused by count, not by fit); an invalid image scores 0 everywhere.
- Only detections whose fitted shape overlaps the component well (``MIN_FIT`` IoU) count as objects, and one
  object painted in two hues (a generated red-orange gradient or two-hue stripes: each hue's component fills the
  same outline) counts once: of detections whose boxes overlap by more than ``SAME_OBJECT`` IoU, the one with the
  larger share of its own colour stays (drawn scenes never overlap, so their objects are never merged).
- ``presence`` and ``binding`` are F1 scores: matches over (asked + detected) / 2, so every extra detection
  costs as much as a missing object. ``found`` keeps the plain recall.
Detection itself (palette segmentation, shape and heading fit, texture statistics) is v1's ``detect``; per-object
styles are read from each detection's texture statistics with v1's thresholds.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image

from .scenes import BACKGROUND
from .scorer import Detection, angle_error, detect, match

MIN_BACKGROUND = 0.5
GROUND_TOLERANCE = 24.0  # max per-channel difference from the ground colour
MIN_FIT = 0.6  # IoU of the fitted shape with the detected component
MAX_DETECTIONS = 6  # twice the most objects a scene has
SAME_OBJECT = 0.6  # box IoU above which two detections are one object in two hues


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)


def ground_share(rgb: np.ndarray) -> float:
    """Share of pixels at the ground colour."""
    return float(np.mean(np.abs(rgb - np.array(BACKGROUND, np.float32)).max(-1) <= GROUND_TOLERANCE))


def object_style(detection: Detection) -> str:
    """One object's fill style from its texture statistics (v1's scene-level thresholds, per object)."""
    if detection.fill < 0.9:
        return "outline"
    if detection.full < 0.37:
        return "dotted"
    return "striped" if detection.full < 0.75 else "flat"


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, width) * max(0, height)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def distinct_objects(detections: list[Detection]) -> list[Detection]:
    """One detection per object: the strongest-coloured of each group of boxes overlapping above ``SAME_OBJECT``."""
    kept: list[Detection] = []
    for detection in sorted(detections, key=lambda d: d.fill * d.area, reverse=True):
        if all(box_iou(detection.box, other.box) <= SAME_OBJECT for other in kept):
            kept.append(detection)
    return kept


def score_image(image: Image.Image | np.ndarray, truth: dict[str, Any]) -> dict[str, Any]:
    """Score ``image`` against the objects a prompt asked for (``truth["objects"]``: shape, colour, and optionally
    style and heading). Keys: valid, ground, presence (shape F1), binding (shape+colour F1), found (recall),
    leakage, heading_error (NaN without a matched arrow), style_agreement (NaN without asked styles),
    extra_objects, detections."""
    rgb = as_rgb(image)
    wanted = truth["objects"]
    ground = ground_share(rgb)
    fitted = [d for d in detect(rgb)[0] if d.fit >= MIN_FIT] if ground >= MIN_BACKGROUND else []
    detections = distinct_objects(fitted)
    valid = ground >= MIN_BACKGROUND and len(detections) <= MAX_DETECTIONS
    detections = detections if valid else []
    matched, bound = match(wanted, detections)
    total = len(wanted) + len(detections)
    colours = {o["colour"] for o in wanted}
    leaked = sum(1 for i, j in matched.items()
                 if detections[j].colour != wanted[i]["colour"] and detections[j].colour in colours)
    errors = [angle_error(detections[j].heading, wanted[i]["heading"]) for i, j in matched.items()
              if wanted[i]["shape"] == "arrow" and "heading" in wanted[i]]
    styled = [(object_style(detections[j]) == wanted[i]["style"]) for i, j in matched.items() if "style" in wanted[i]]
    n = max(1, len(wanted))
    return {"valid": float(valid), "ground": ground,
            "presence": 2 * len(matched) / total if total else 0.0,
            "binding": 2 * bound / total if total else 0.0,
            "found": len(matched) / n, "leakage": leaked / n,
            "heading_error": float(np.mean(errors)) if errors else float("nan"),
            "style_agreement": float(np.mean(styled)) if styled else float("nan"),
            "extra_objects": len(detections) - len(matched), "detections": [asdict(d) for d in detections]}


def score_file(path: str, truth: dict[str, Any]) -> dict[str, Any]:
    """``score_image`` of a saved image (what benchmark worker processes call)."""
    with Image.open(path) as image:
        return score_image(image.convert("RGB"), truth)
