"""Procedural micro-world scenes: 1-3 coloured shapes on a plain ground, one global style, a templated caption and
the exact ground truth (shape, colour, box, heading, style), all from one seed.

Why a procedural world: no image weights and no metric model (CLIP, BLIP-VQA, detectors) install offline, so the
image controls can only be measured in a world whose ground truth is known by construction and whose images a
classical scorer (``scorer.py``) can read back.

Conventions: pixel coordinates with y down; headings in degrees counter-clockwise from "pointing right" (0 =
right, 90 = up, 180 = left, 270 = down). Arrows and triangles have a heading; circles, squares and stars are drawn
upright (heading 0).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {  # hues ~25 degrees or more apart, all strongly saturated
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 30),
    "green": (40, 160, 60),
    "cyan": (30, 185, 200),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 110, 190),
}
BACKGROUND = (236, 234, 228)
SHAPES = ("circle", "square", "triangle", "star", "arrow")
ORIENTED = ("arrow", "triangle")
STYLES = ("flat", "outline", "striped", "dotted", "watercolour")
DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")  # every 45 degrees
TRIANGLE_HEADINGS = (0, 90, 180, 270)
HEADING_JITTER = 8.0  # degrees around each named direction, so headings are continuous but still nameable
STRIPE_PERIOD = 4  # pixels (at 64 px; scaled with the image)
TINT = 0.5  # striped/dotted fill: the colour mixed half-and-half with white


def direction_word(heading: float) -> str:
    return DIRECTIONS[int(round((heading % 360) / 45.0)) % 8]


@dataclass
class SceneObject:
    shape: str
    colour: str
    center: tuple[float, float]  # pixels, y down
    radius: float  # pixels: the shape's outer radius
    heading: float = 0.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (inclusive) of the drawn pixels

    @property
    def oriented(self) -> bool:
        return self.shape in ORIENTED

    def phrase(self, orientation: bool = True) -> str:
        text = f"{self.colour} {self.shape}"
        if orientation and self.oriented:
            text += f" pointing {direction_word(self.heading)}"
        return text


@dataclass
class Scene:
    seed: int
    size: int
    style: str
    objects: list[SceneObject]
    caption: str = ""
    template: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def truth(self) -> dict[str, Any]:
        """JSON-ready ground truth."""
        return {"seed": self.seed, "size": self.size, "style": self.style, "caption": self.caption,
                "objects": [asdict(o) for o in self.objects]}


def shape_polygon(shape: str, center: tuple[float, float], radius: float, heading: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` in image coordinates (circles as a 48-gon). Local frame: +x is the heading."""
    if shape == "circle":
        local = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
    elif shape == "square":
        s = 0.8  # half side: a square of the same visual weight as the circle
        local = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":  # isosceles, apex along the heading, so its heading is unambiguous
        local = [(1.0, 0.0), (math.cos(math.radians(145)), math.sin(math.radians(145))),
                 (math.cos(math.radians(215)), math.sin(math.radians(215)))]
    elif shape == "star":  # five points, one pointing up when heading is 0
        local = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = math.pi / 2 + k * math.pi / 5
            local.append((r * math.cos(a), r * math.sin(a)))
        heading = 0.0
    elif shape == "arrow":  # shaft from the tail, a wide head at +x
        local = [(-1.0, -0.22), (0.1, -0.22), (0.1, -0.62), (1.0, 0.0), (0.1, 0.62), (0.1, 0.22), (-1.0, 0.22)]
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    a = math.radians(heading)
    cx, cy = center
    return [(cx + radius * (x * math.cos(a) - y * math.sin(a)), cy - radius * (x * math.sin(a) + y * math.cos(a)))
            for x, y in local]


def shape_mask(shape: str, center: tuple[float, float], radius: float, heading: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of the filled shape (no anti-aliasing, so colours stay exact)."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape, center, radius, heading), fill=255)
    return np.asarray(canvas) > 0


def outline_of(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``mask`` within ``width`` pixels of its edge."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, iterations=width, border_value=0)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(up), -1, 1)


def render(scene: Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and each object's pixel mask (the pixels that carry its colour or tint)."""
    size, style = scene.size, scene.style
    rng = np.random.default_rng([scene.seed, 7])
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    scale = size / 64.0
    period = max(2, int(round(STRIPE_PERIOD * scale)))
    yy, xx = np.mgrid[0:size, 0:size]
    if style == "watercolour":  # paper grain on the ground
        image += rng.normal(0, 3.0, (size, size, 1)).astype(np.float32)
    masks = []
    for obj in scene.objects:
        filled = shape_mask(obj.shape, obj.center, obj.radius, obj.heading, size)
        colour = np.array(PALETTE[obj.colour], np.float32)
        tint = colour * (1 - TINT) + 255 * TINT
        if style == "outline":
            drawn = outline_of(filled, max(1, int(round(2 * scale))))
            image[drawn] = colour
        elif style == "striped":  # diagonal bands of the colour over its tint
            drawn = filled
            band = ((xx + yy) // max(1, period // 2)) % 2 == 0
            image[filled & band] = colour
            image[filled & ~band] = tint
        elif style == "dotted":  # dots of the colour on a regular grid over its tint
            drawn = filled
            half = max(1, period // 2)
            dots = ((xx % period) < half) & ((yy % period) < half)
            image[filled] = tint
            image[filled & dots] = colour
        elif style == "watercolour":  # blotchy pigment, soft edges
            drawn = filled
            alpha = np.asarray(Image.fromarray((filled * 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(0.8 * scale)), np.float32)[..., None] / 255.0
            wash = 1 + 0.18 * smooth_noise(rng, size, 5)[..., None]
            pigment = np.clip(colour * wash + rng.normal(0, 6.0, (size, size, 1)), 0, 255)
            image = image * (1 - alpha) + pigment * alpha
        else:
            drawn = filled
            image[filled] = colour
        masks.append(drawn)
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)), masks


TEMPLATES = (  # {objects}: "a red arrow pointing left and an orange star"; {style}: ", in striped style" or ""
    "{objects}{style}",
    "a picture of {objects}{style}",
    "a drawing of {objects}{style}",
    "there is {objects}{style}",
)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_phrases(phrases: list[str]) -> str:
    """["red arrow", "orange star", "green circle"] -> "a red arrow, an orange star and a green circle"."""
    parts = [with_article(p) for p in phrases]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_for(scene: Scene, template: int, with_style: bool, with_orientation: bool) -> str:
    objects = join_phrases([o.phrase(with_orientation) for o in scene.objects])
    style = f", in {scene.style} style" if with_style else ""
    return TEMPLATES[template].format(objects=objects, style=style)


def place(rng: np.random.Generator, size: int, count: int, shapes: list[str]) -> list[tuple[float, float, float]]:
    """Non-overlapping (centre x, centre y, radius) by rejection sampling: discs separated by a 2 px gap."""
    scale = size / 64.0
    margin = 2 * scale
    for _ in range(200):
        placed: list[tuple[float, float, float]] = []
        for _shape in shapes[:count]:
            for _try in range(50):
                radius = rng.uniform(8.0, 14.0) * scale if count > 1 else rng.uniform(10.0, 18.0) * scale
                x = rng.uniform(radius + margin, size - radius - margin)
                y = rng.uniform(radius + margin, size - radius - margin)
                if all(math.hypot(x - px, y - py) > radius + pr + margin for px, py, pr in placed):
                    placed.append((x, y, radius))
                    break
        if len(placed) == count:
            return placed
    raise RuntimeError("could not place the objects without overlap")


def make_scene(seed: int, size: int = 64, objects: int | None = None, style: str | None = None,
               caption_style: bool | None = None, caption_orientation: bool | None = None,
               template: int | None = None, require: str | None = None) -> Scene:
    """A random scene for ``seed``: the same seed (and arguments) always gives the same scene and caption.

    ``require`` forces one object to be that shape (e.g. "arrow" for orientation benchmarks); caption options
    left as None are drawn at random (style named 75 % of the time, headings 80 %)."""
    if size not in (64, 128):
        raise ValueError("Scenes are 64 or 128 pixels square.")
    rng = np.random.default_rng([seed, 1])
    count = int(objects if objects is not None else rng.choice([1, 2, 2, 3]))
    shapes = [str(s) for s in rng.choice(SHAPES, size=count)]
    if require is not None and require not in shapes:
        shapes[int(rng.integers(count))] = require
    colours = [str(c) for c in rng.choice(list(PALETTE), size=count, replace=False)]
    chosen_style = style or str(rng.choice(STYLES))
    spots = place(rng, size, count, shapes)
    items = []
    for shape, colour, (x, y, radius) in zip(shapes, colours, spots):
        heading = 0.0
        if shape == "arrow":
            heading = (45.0 * int(rng.integers(8)) + rng.uniform(-HEADING_JITTER, HEADING_JITTER)) % 360
        elif shape == "triangle":
            heading = float(rng.choice(TRIANGLE_HEADINGS))
        items.append(SceneObject(shape, colour, (float(x), float(y)), float(radius), float(heading)))
    scene = Scene(seed, size, chosen_style, items)
    _, masks = render(scene)
    for obj, mask in zip(items, masks):
        ys, xs = np.nonzero(mask)
        obj.box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    with_style = bool(rng.random() < 0.75) if caption_style is None else caption_style
    with_orientation = bool(rng.random() < 0.8) if caption_orientation is None else caption_orientation
    scene.template = int(rng.integers(len(TEMPLATES))) if template is None else template
    scene.caption = caption_for(scene, scene.template, with_style, with_orientation)
    return scene
