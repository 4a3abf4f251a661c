"""Micro-world v2 scenes: 1-3 shapes at 128 px with skewed shape-colour priors, per-object fill styles and named
arrow headings, sampled in batches (numpy) and rasterised in batches from signed distances (torch, any device).

Why this world (issue 22): a binding control can only show an effect where the model has a prior to fight.
Each shape has a favourite colour (``FAVOURITE``, drawn ``PRIOR`` of the time), and the *swapped* pairs -- a
circle in the square's favourite colour next to a square in the circle's -- never appear in training: they are
the held-out test prompts (``swapped_prompts``). Per-object styles ("a striped red circle") give LPA a target
per object; arrows carry a heading named next to their noun ("a green arrow pointing left") for Compass Control.
Rendering on the accelerator makes data free: a training step draws fresh scenes instead of reading a dataset.

Geometry is v1's (``scenes.shape_polygon``), so v1's classical shape fitter reads these images too.
Conventions as v1: pixel coordinates with y down, headings in degrees counter-clockwise from "pointing right".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .scenes import BACKGROUND, DIRECTIONS, PALETTE, SHAPES, TEMPLATES, direction_word, join_phrases, shape_polygon

SIZE = 128
COLOURS = tuple(PALETTE)
STYLES = ("flat", "striped", "dotted", "outline")
FAVOURITE = {"circle": "red", "square": "blue", "triangle": "yellow", "star": "purple", "arrow": "green"}
PRIOR = 0.6  # share of objects drawn in their shape's favourite colour (the rest: uniform over the others)
MAX_OBJECTS = 3
OBJECT_COUNTS = (1, 2, 2, 3, 3)  # single objects too, so single-object colour accuracy is in distribution
STYLE_MODES = (("plain", 0.5), ("global", 0.2), ("per-object", 0.3))
HEADING_JITTER = 8.0
TINT = 0.5  # striped/dotted: the colour mixed half-and-half with white, as v1
STRIPE_PERIOD = 8  # pixels at 128 px
OUTLINE_WIDTH = 4.0  # pixels at 128 px
GAP = 4.0  # pixels between the discs that bound two objects


def local_polygons() -> torch.Tensor:
    """[shapes, 10, 2] vertices at radius 1, heading 0, y up; shorter polygons repeat their last vertex."""
    polygons = []
    for shape in SHAPES:
        points = [(x, -y) for x, y in shape_polygon(shape, (0.0, 0.0), 1.0, 0.0)] if shape != "circle" else [(0, 0)]
        points += [points[-1]] * (10 - len(points))
        polygons.append(points[:10])
    return torch.tensor(polygons, dtype=torch.float32)


POLYGONS = local_polygons()


@dataclass
class Layouts:
    """A batch of scenes as arrays ([batch, MAX_OBJECTS] each; objects past ``count`` are unused)."""

    shape: np.ndarray  # index into SHAPES
    colour: np.ndarray  # index into COLOURS
    style: np.ndarray  # index into STYLES
    center: np.ndarray  # [batch, objects, 2] pixels, y down
    radius: np.ndarray
    heading: np.ndarray  # degrees; arrows only (others 0, triangles 90: apex up)
    count: np.ndarray  # [batch]
    mode: np.ndarray  # [batch] index into STYLE_MODES
    size: int = SIZE

    def __len__(self) -> int:
        return len(self.count)

    def objects(self, i: int) -> list[dict[str, Any]]:
        return [{"shape": SHAPES[self.shape[i, k]], "colour": COLOURS[self.colour[i, k]],
                 "style": STYLES[self.style[i, k]], "center": tuple(float(v) for v in self.center[i, k]),
                 "radius": float(self.radius[i, k]), "heading": float(self.heading[i, k])}
                for k in range(int(self.count[i]))]


def swapped(shape: np.ndarray, colour: np.ndarray, count: np.ndarray) -> np.ndarray:
    """[batch] True where two objects wear each other's favourite colours (the held-out combinations)."""
    favourite = np.array([COLOURS.index(FAVOURITE[s]) for s in SHAPES])
    hit = np.zeros(len(count), bool)
    for a in range(MAX_OBJECTS):
        for b in range(MAX_OBJECTS):
            both = (a != b) & (a < count) & (b < count) & (shape[:, a] != shape[:, b])
            hit |= both & (colour[:, a] == favourite[shape[:, b]]) & (colour[:, b] == favourite[shape[:, a]])
    return hit


def draw_colours(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    favourite = np.array([COLOURS.index(FAVOURITE[s]) for s in SHAPES])[shape]
    other = (favourite + rng.integers(1, len(COLOURS), shape.shape)) % len(COLOURS)
    return np.where(rng.random(shape.shape) < PRIOR, favourite, other)


def draw_places(rng: np.random.Generator, count: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = size / SIZE
    single = (count == 1)[:, None]
    radius = np.where(single, rng.uniform(18, 32, (len(count), MAX_OBJECTS)),
                      rng.uniform(14, 25, (len(count), MAX_OBJECTS))) * scale
    margin = 2 * scale
    center = radius[..., None] + margin + rng.random((len(count), MAX_OBJECTS, 2)) * (size - 2 * (radius[..., None]
                                                                                                   + margin))
    return center, radius


def overlapping(center: np.ndarray, radius: np.ndarray, count: np.ndarray, gap: float) -> np.ndarray:
    hit = np.zeros(len(count), bool)
    for a in range(MAX_OBJECTS):
        for b in range(a + 1, MAX_OBJECTS):
            distance = np.linalg.norm(center[:, a] - center[:, b], axis=-1)
            hit |= (b < count) & (distance < radius[:, a] + radius[:, b] + gap)
    return hit


def swap_pairs(rng: np.random.Generator, count: np.ndarray, shape: np.ndarray,
               colour: np.ndarray) -> np.ndarray:
    """Make objects 0 and 1 of every scene a swapped pair (two shapes, each in the other's favourite colour), in
    place; returns the counts (at least 2)."""
    favourite = np.array([COLOURS.index(FAVOURITE[s]) for s in SHAPES])
    first = rng.integers(0, len(SHAPES), len(count))
    second = (first + rng.integers(1, len(SHAPES), len(count))) % len(SHAPES)
    shape[:, 0], shape[:, 1] = first, second
    colour[:, 0], colour[:, 1] = favourite[second], favourite[first]
    return np.maximum(count, 2)


def draw_batch(rng: np.random.Generator, n: int, size: int, held_out: bool = False) -> Layouts:
    count = rng.choice(OBJECT_COUNTS, n)
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    colour = draw_colours(rng, shape)
    if held_out:
        count = swap_pairs(rng, count, shape, colour)
    mode = rng.choice(len(STYLE_MODES), n, p=[p for _, p in STYLE_MODES])
    per_object = rng.integers(0, len(STYLES), (n, MAX_OBJECTS))
    shared = np.repeat(rng.integers(1, len(STYLES), (n, 1)), MAX_OBJECTS, 1)
    style = np.select([mode[:, None] == 0, mode[:, None] == 1], [np.zeros_like(shared), shared], per_object)
    arrow = shape == SHAPES.index("arrow")
    direction = 45.0 * rng.integers(0, 8, (n, MAX_OBJECTS)) + rng.uniform(-HEADING_JITTER, HEADING_JITTER,
                                                                          (n, MAX_OBJECTS))
    heading = np.where(arrow, direction % 360, np.where(shape == SHAPES.index("triangle"), 90.0, 0.0))
    center, radius = draw_places(rng, count, size)
    return Layouts(shape, colour, style, center, radius, heading, count, mode, size)


def distinct_colours(colour: np.ndarray, count: np.ndarray) -> np.ndarray:
    ok = np.ones(len(count), bool)
    for a in range(MAX_OBJECTS):
        for b in range(a + 1, MAX_OBJECTS):
            ok &= ~((b < count) & (colour[:, a] == colour[:, b]))
    return ok


def sample_layouts(n: int, seed: int | tuple[int, ...], size: int = SIZE, held_out: bool = False) -> Layouts:
    """``n`` scenes for ``seed`` (the same seed always gives the same scenes). Colours within a scene differ and
    objects do not touch; ``held_out=False`` (training) rejects the swapped combinations, ``True`` keeps only them."""
    rng = np.random.default_rng(seed)
    result = draw_batch(rng, n, size, held_out)
    for _ in range(1000):
        bad = ~distinct_colours(result.colour, result.count)
        bad |= overlapping(result.center, result.radius, result.count, GAP * size / SIZE)
        bad |= swapped(result.shape, result.colour, result.count) != held_out
        if not bad.any():
            return result
        fresh = draw_batch(rng, int(bad.sum()), size, held_out)
        for name in ("shape", "colour", "style", "center", "radius", "heading", "count", "mode"):
            getattr(result, name)[bad] = getattr(fresh, name)
    raise RuntimeError("could not sample scenes that satisfy the constraints")


def object_phrase(obj: dict[str, Any], name_style: bool, name_heading: bool) -> str:
    words = [obj["style"]] if name_style and obj["style"] != "flat" else []
    text = " ".join(words + [obj["colour"], obj["shape"]])
    if name_heading and obj["shape"] == "arrow":
        text += f" pointing {direction_word(obj['heading'])}"
    return text


def caption(layouts: Layouts, i: int, rng: np.random.Generator, name_heading: bool | None = None,
            suffixes: list[str] | None = None) -> str:
    """A fresh caption variant for scene ``i``: template, headings named (80 % unless ``name_heading`` says), a
    global style named (75 %); ``suffixes`` (one per object, e.g. "moving left") follow each object's phrase."""
    mode = STYLE_MODES[int(layouts.mode[i])][0]
    name_heading = bool(rng.random() < 0.8) if name_heading is None else name_heading
    objects = layouts.objects(i)
    suffixes = suffixes or [""] * len(objects)
    phrases = join_phrases([" ".join(filter(None, [object_phrase(o, mode == "per-object", name_heading), extra]))
                            for o, extra in zip(objects, suffixes)])
    style = f", in {objects[0]['style']} style" if mode == "global" and rng.random() < 0.75 else ""
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(objects=phrases, style=style)


def turned_headings(layouts: Layouts, rng: np.random.Generator) -> Layouts:
    """A copy whose arrows point elsewhere (turned by 90, 180 or 270 degrees): its captions are the contrastive
    stage's hard negatives, so the text tower cannot treat "left" and "right" as one word."""
    turn = 90.0 * rng.integers(1, 4, size=layouts.heading.shape)
    arrow = layouts.shape == SHAPES.index("arrow")
    return dataclasses.replace(layouts, heading=np.where(arrow, (layouts.heading + turn) % 360, layouts.heading))


def full_caption(layouts: Layouts, i: int) -> str:
    """The caption that names everything (styles and headings) with the first template: for tests and gates."""
    mode = STYLE_MODES[int(layouts.mode[i])][0]
    objects = layouts.objects(i)
    phrases = join_phrases([object_phrase(o, mode == "per-object", True) for o in objects])
    return phrases + (f", in {objects[0]['style']} style" if mode == "global" else "")


def polygon_distance(p: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from points ``p`` [..., P, 2] to polygons ``vertices`` [..., V, 2]."""
    best = torch.full(p.shape[:-1], float("inf"), device=p.device)
    inside = torch.zeros(p.shape[:-1], dtype=torch.bool, device=p.device)
    count = vertices.shape[-2]
    for i in range(count):
        start, end = vertices[..., i, None, :], vertices[..., (i + 1) % count, None, :]
        edge, offset = end - start, p - start
        along = ((offset * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-12)).clamp(0, 1)
        best = torch.minimum(best, ((offset - edge * along[..., None]) ** 2).sum(-1))
        crosses = (p[..., 1] >= start[..., 1]) != (p[..., 1] >= end[..., 1])
        x_cross = start[..., 0] + (p[..., 1] - start[..., 1]) * edge[..., 0] / torch.where(
            edge[..., 1] == 0, torch.ones_like(edge[..., 1]), edge[..., 1])
        inside ^= crosses & (p[..., 0] < x_cross)
    return torch.where(inside, -1.0, 1.0) * best.sqrt()


def signed_distances(layouts: Layouts, device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, objects, size, size] signed distance in pixels of every pixel centre to every object."""
    size = layouts.size
    coords = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    pixels = torch.stack([xx.flatten(), yy.flatten()], -1)  # [P, 2], y down
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    center, radius, heading = as_tensor(layouts.center), as_tensor(layouts.radius), as_tensor(layouts.heading)
    rel = pixels - center[..., None, :]
    rel = torch.stack([rel[..., 0], -rel[..., 1]], -1) / radius[..., None, None]  # y up, unit radius
    angle = torch.deg2rad(heading)[..., None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    local = torch.stack([rel[..., 0] * cos + rel[..., 1] * sin, -rel[..., 0] * sin + rel[..., 1] * cos], -1)
    shape = torch.as_tensor(layouts.shape, device=device)
    distance = polygon_distance(local, POLYGONS.to(device)[shape])
    circle = local.norm(dim=-1) - 1.0
    distance = torch.where((shape == SHAPES.index("circle"))[..., None], circle, distance) * radius[..., None]
    return distance.view(*distance.shape[:-1], size, size)


def fill_pattern(style: torch.Tensor, size: int, device: torch.device | str) -> torch.Tensor:
    """[batch, objects, size, size] 1 where a pixel carries the full colour, 0 where the tint (by style)."""
    scale = size / SIZE
    period = max(2, round(STRIPE_PERIOD * scale))
    half = max(1, period // 2)
    coords = torch.arange(size, device=device)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    stripes = (((xx + yy) // half) % 2 == 0).float()
    dots = (((xx % period) < half) & ((yy % period) < half)).float()
    full = torch.ones_like(stripes)
    patterns = torch.stack([full, stripes, dots, full])  # flat, striped, dotted, outline
    return patterns[style]


def render_layouts(layouts: Layouts, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [batch, 3, size, size] in [0, 1], coverage [batch, objects, size, size] in [0, 1]).

    Edges are anti-aliased over one pixel; outlines are a band inside the edge; striped and dotted fills mix the
    colour with its tint; objects past a scene's count have zero coverage."""
    size = layouts.size
    distance = signed_distances(layouts, device)
    style = torch.as_tensor(layouts.style, device=device)
    width = OUTLINE_WIDTH * size / SIZE
    ring = (distance + width / 2).abs() - width / 2
    is_outline = (style == STYLES.index("outline"))[..., None, None]
    coverage = (0.5 - torch.where(is_outline, ring, distance)).clamp(0, 1)
    present = torch.arange(MAX_OBJECTS, device=device) < torch.as_tensor(layouts.count, device=device)[:, None]
    coverage = coverage * present[..., None, None]
    palette = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32, device=device) / 255
    colour = palette[torch.as_tensor(layouts.colour, device=device)][..., None, None]  # [B, K, 3, 1, 1]
    tint = colour * (1 - TINT) + TINT
    full = fill_pattern(style, size, device)[:, :, None]
    paint = tint + (colour - tint) * full
    image = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 255
    image = image.expand(len(layouts), 3, size, size)
    for k in range(MAX_OBJECTS):
        alpha = coverage[:, k, None]
        image = image * (1 - alpha) + paint[:, k] * alpha
    return image, coverage


def boxes(coverage: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per scene, per present object: (x0, y0, x1, y1) inclusive pixel box of its coverage >= 0.5."""
    drawn = (coverage >= 0.5).cpu()
    result = []
    for scene in drawn:
        scene_boxes = []
        for mask in scene:
            if not mask.any():
                continue
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            scene_boxes.append((int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])))
        result.append(scene_boxes)
    return result


def truths(layouts: Layouts, coverage: torch.Tensor) -> list[dict[str, Any]]:
    """JSON-ready ground truth per scene (the v2 scorer's input): objects with shape, colour, style, box, heading."""
    out = []
    for i, scene_boxes in enumerate(boxes(coverage)):
        objects = [{**obj, "box": box} for obj, box in zip(layouts.objects(i), scene_boxes)]
        out.append({"size": layouts.size, "mode": STYLE_MODES[int(layouts.mode[i])][0], "objects": objects,
                    "caption": full_caption(layouts, i)})
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[batch, 3, H, W] in [0, 1] -> [batch, H, W, 3] uint8 (for PIL and the scorer)."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def swapped_prompts() -> list[tuple[str, list[tuple[str, str]]]]:
    """The held-out test prompts: every ordered pair of shapes, each in the other's favourite colour."""
    prompts = []
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                pairs = [(FAVOURITE[b], a), (FAVOURITE[a], b)]
                prompts.append((join_phrases([f"{c} {s}" for c, s in pairs]), pairs))
    return prompts


def single_object_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour-shape combination, one object each (all seen in training)."""
    return [(join_phrases([f"{c} {s}"]), c, s) for s in SHAPES for c in COLOURS]


def heading_prompts() -> list[tuple[str, float]]:
    """(prompt, heading) for a green arrow in each named direction."""
    return [(f"a {FAVOURITE['arrow']} arrow pointing {word}", 45.0 * k) for k, word in enumerate(DIRECTIONS)]


def vocabulary() -> list[str]:
    """Every word a v2 caption (still or moving) can use: the word-level tokenizer's vocabulary."""
    words = set()
    for template in TEMPLATES:
        words.update(template.replace("{objects}", " ").replace("{style}", " ").split())
    # "moving" and "spinning": the motion captions' (motion_v2), whole tokens for the next text tower trained
    words.update(["a", "an", "and", "in", "style", "pointing", "moving", "spinning", *COLOURS, *SHAPES, *STYLES])
    for direction in DIRECTIONS:
        words.update(direction.split("-"))
    return sorted(words)
