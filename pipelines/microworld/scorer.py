"""Classical scorer for micro-world images: which coloured shapes are there, where they point, in which style.

No learned weights, so it works before any model is trained and cannot share a model's blind spots:
1. Colour segmentation against the palette: pixels with enough chroma are foreground; each takes the palette
   colour of nearest hue (tints keep their colour's hue, so striped and dotted fills stay one colour).
2. Objects: connected components per colour (after a small closing, so stripes and dots join), holes filled.
3. Shape and heading: the generator's own shape geometry fitted to each component, area-matched and
   centroid-aligned, over shapes and headings (5 degrees, then refined to 1 degree); the best IoU wins. An
   arrow's heading is thus read from where its head is, not from a symmetric axis.
4. Style from texture statistics: how much of the filled shape carries colour (outline), the share of pixels at
   full chroma against tint (striped about one half, dotted about one quarter), and blotches in the pigment that
   survive smoothing, beyond the ground's own noise (watercolour).
``score_image`` then compares the detections with what the prompt asked for.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .scenes import PALETTE, SHAPES, Scene, shape_polygon

MIN_CHROMA = 32.0  # max - min channel value: the ground is grey, the palette's tints have >= 45
WASH = 3.0  # smoothed grey-level std inside shapes minus the ground's: flat ~0-3, watercolour ~4-8
GRAIN = 1.5  # std of the ground's grey level above which it counts as watercolour paper (generated: ~3)
MIN_AREA = 12  # pixels at 64 px (scaled with the image area)
HEADINGS = {"circle": (0.0,), "star": (0.0,), "square": tuple(range(0, 90, 15)),
            "triangle": tuple(range(0, 360, 5)), "arrow": tuple(range(0, 360, 5))}


def hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (max - min) of an [..., 3] array of 0-255 values."""
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return hue, rgb.max(-1) - rgb.min(-1)


PALETTE_NAMES = list(PALETTE)
PALETTE_HUE, PALETTE_CHROMA = hue_chroma(np.array([PALETTE[n] for n in PALETTE_NAMES], np.float32))


@dataclass
class Detection:
    shape: str
    colour: str
    box: tuple[int, int, int, int]
    heading: float
    fit: float  # IoU of the fitted shape with the component
    area: int
    fill: float  # coloured pixels / filled pixels (low for outlines)
    full: float  # share of interior pixels at full chroma (vs tint)
    wash: float  # std of the smoothed grey level inside the shape: watercolour's blotches survive smoothing


def polygon_area_centroid(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    area /= 2
    return abs(area), cx / (6 * area), cy / (6 * area)


def template_mask(shape: str, heading: float, area: float, centroid: tuple[float, float],
                  size: int) -> np.ndarray:
    """The shape at ``heading`` scaled to ``area`` pixels with its centroid at ``centroid``."""
    unit = shape_polygon(shape, (0.0, 0.0), 1.0, heading)
    unit_area, ux, uy = polygon_area_centroid(unit)
    radius = math.sqrt(area / unit_area)
    points = [(centroid[0] + radius * (x - ux), centroid[1] + radius * (y - uy)) for x, y in unit]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 0


def fit_shape(filled: np.ndarray) -> tuple[str, float, float]:
    """(shape, heading, IoU) of the best-fitting generator shape for the boolean mask ``filled``."""
    size = filled.shape[0]
    ys, xs = np.nonzero(filled)
    area, centroid = float(len(xs)), (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)

    def iou(shape: str, heading: float) -> float:
        template = template_mask(shape, heading, area, centroid, size)
        union = np.count_nonzero(template | filled)
        return np.count_nonzero(template & filled) / union if union else 0.0

    best = max(((iou(s, h), s, h) for s in SHAPES for h in HEADINGS[s]))
    score, shape, heading = best
    if len(HEADINGS[shape]) > 1:
        step = HEADINGS[shape][1] - HEADINGS[shape][0]
        score, heading = max((iou(shape, (heading + d) % 360), (heading + d) % 360)
                             for d in range(-step + 1, step))
    return shape, float(heading % 360), float(score)


def detect(image: Image.Image | np.ndarray) -> tuple[list[Detection], float]:
    """Objects in ``image`` and the ground's grain (std of its grey level, for the watercolour style)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    size = rgb.shape[0]
    hue, chroma = hue_chroma(rgb)
    foreground = chroma >= MIN_CHROMA
    distance = np.abs((hue[..., None] - PALETTE_HUE + 180) % 360 - 180)
    nearest = distance.argmin(-1)
    min_area = MIN_AREA * (size / 64) ** 2
    smoothed = ndimage.gaussian_filter(rgb.mean(-1), sigma=2.0 * size / 64)
    detections = []
    for index, name in enumerate(PALETTE_NAMES):
        pixels = foreground & (nearest == index)
        if np.count_nonzero(pixels) < min_area:
            continue
        joined = ndimage.binary_closing(pixels, iterations=1) | pixels
        labels, count = ndimage.label(joined, structure=np.ones((3, 3)))
        for label in range(1, count + 1):
            component = labels == label
            filled = ndimage.binary_fill_holes(component)
            area = int(np.count_nonzero(filled))
            if area < min_area:
                continue
            shape, heading, fit = fit_shape(filled)
            interior = ndimage.binary_erosion(filled, iterations=1)
            interior = interior if interior.any() else filled
            strength = chroma[interior & pixels] / PALETTE_CHROMA[index]
            core = ndimage.binary_erosion(filled, iterations=max(3, round(3 * size / 64)))
            core = core if core.any() else interior
            ys, xs = np.nonzero(filled)
            detections.append(Detection(
                shape, name, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), heading, fit, area,
                float(np.count_nonzero(component & pixels) / area),
                float(np.mean(strength > 0.75)) if strength.size else 0.0, float(smoothed[core].std())))
    ground = ~ndimage.binary_dilation(foreground, iterations=2)
    grain = float(rgb[ground].mean(-1).std()) if ground.any() else 0.0
    return detections, grain


def classify_style(detections: list[Detection], grain: float) -> str:
    """The scene's style from its objects' texture statistics (weighted by area) and the ground's grain."""
    if not detections:
        return "watercolour" if grain > GRAIN else "flat"
    weights = np.array([d.area for d in detections], np.float32)
    fill = float(np.average([d.fill for d in detections], weights=weights))
    full = float(np.average([d.full for d in detections], weights=weights))
    if fill < 0.9:  # generated outlines fill 0.2-0.75 of their shape, filled styles 0.98-1
        return "outline"
    wash = float(np.average([d.wash for d in detections], weights=weights))
    if grain > GRAIN and wash - grain > WASH:  # paper grain, and blotches beyond what the ground's noise explains
        return "watercolour"
    if full < 0.37:  # dotted ~0.25, striped ~0.5, flat 1
        return "dotted"
    return "striped" if full < 0.75 else "flat"


def angle_error(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def match(wanted: list[dict[str, Any]], detections: list[Detection]) -> tuple[dict[int, int], int]:
    """Asked object -> detection: exact (shape and colour) matches first, then the same shape in any colour.
    Returns the matching and how many of them are exact."""
    free = list(range(len(detections)))
    matched: dict[int, int] = {}
    for exact in (True, False):
        for i, obj in enumerate(wanted):
            if i in matched:
                continue
            for j in free:
                if detections[j].shape == obj["shape"] and (not exact or detections[j].colour == obj["colour"]):
                    matched[i] = j
                    free.remove(j)
                    break
        if exact:
            bound = len(matched)
    return matched, bound


def score_image(image: Image.Image | np.ndarray, expected: Scene | dict[str, Any]) -> dict[str, Any]:
    """Score ``image`` against the objects and style a prompt asked for.

    Per image: ``binding`` (share of asked objects found with the right shape *and* colour), ``presence``
    (right shape, any colour), ``leakage`` (an asked shape wearing another asked object's colour),
    ``heading_error`` (mean over the asked arrows found, degrees; NaN when none), ``style_correct``, and the
    detections themselves."""
    truth = expected.truth() if isinstance(expected, Scene) else expected
    wanted = truth["objects"]
    detections, grain = detect(image)
    style = classify_style(detections, grain)
    matched, bound = match(wanted, detections)
    colours = {o["colour"] for o in wanted}
    leaked = sum(1 for i, j in matched.items()
                 if detections[j].colour != wanted[i]["colour"] and detections[j].colour in colours)
    errors = [angle_error(detections[matched[i]].heading, obj.get("heading", 0.0))
              for i, obj in enumerate(wanted) if obj["shape"] == "arrow" and i in matched]
    n = max(1, len(wanted))
    return {"binding": bound / n, "presence": len(matched) / n, "leakage": leaked / n,
            "heading_error": float(np.mean(errors)) if errors else float("nan"),
            "style": style, "style_correct": float(style == truth["style"]),
            "extra_objects": len(detections) - len(matched), "detections": [asdict(d) for d in detections]}
