"""Moving micro-world v2 scenes: clips of ``frames`` frames in which every object drifts at a constant velocity
(arrows along their heading) or spins in place, captioned with the motion ("a red circle moving left", "a green
arrow pointing up moving up"), the training data of the micro-world motion adapter (``train_motion``).

Why a clip is a batch of v2 scenes: each frame is a ``scenes_v2.Layouts`` with the objects' centres (and
headings) advanced, so ``scenes_v2.render_layouts`` draws a whole batch of clips in one call on the accelerator,
and the frames are exactly the image model's world -- the frozen UNet has seen every frame's content already, so
the motion modules only have to learn how it moves. Scenes are sampled by ``scenes_v2.sample_layouts`` (priors,
held-out swaps, no overlaps) for the clip's middle frame; each object's path is then slid, if need be, until it
stays inside the frame from first to last frame (objects may pass over each other mid-clip).

Conventions as v2: pixels with y down, headings counter-clockwise from "pointing right", so a velocity along
heading h is (cos h, -sin h) pixels per frame.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import scenes_v2
from .scenes import DIRECTIONS, PALETTE, SHAPES, direction_word

FRAMES = 16  # AnimateDiff's training clip length
SPEED = (1.0, 3.0)  # pixels per frame at 128 px: 15-45 px over 16 frames, always visible at 32x32 latents
SPIN = (6.0, 15.0)  # degrees per frame, either way
SPIN_SHARE = 0.1  # of squares, stars and triangles: spin in place instead of moving
STILL_SHARE = 0.1  # of all objects: stay put (captioned without a motion)
MARGIN = 2.0  # pixels between an object's bounding disc and the frame edge, as scenes_v2


@dataclass
class Clips:
    """A batch of clips: the scenes at frame 0 and each object's constant motion ([batch, objects, ...])."""

    start: scenes_v2.Layouts
    velocity: np.ndarray  # [batch, objects, 2] pixels per frame, y down
    spin: np.ndarray  # [batch, objects] degrees per frame, counter-clockwise
    frames: int = FRAMES

    def __len__(self) -> int:
        return len(self.start)

    def all_frames(self) -> scenes_v2.Layouts:
        """Every frame of every clip as one batch of scenes, clip-major (clip 0's frames first)."""
        f = np.arange(self.frames)[None, :, None]
        repeat = lambda a: np.repeat(a, self.frames, axis=0)  # noqa: E731
        center = self.start.center[:, None] + f[..., None] * self.velocity[:, None]
        heading = self.start.heading[:, None] + f * self.spin[:, None]
        return scenes_v2.Layouts(repeat(self.start.shape), repeat(self.start.colour), repeat(self.start.style),
                                 center.reshape(-1, *center.shape[2:]), repeat(self.start.radius),
                                 heading.reshape(-1, heading.shape[-1]) % 360, repeat(self.start.count),
                                 repeat(self.start.mode), self.start.size)

    def motion_words(self, i: int, reverse: bool = False) -> list[str]:
        """Per present object of clip ``i``: "moving left", "spinning" or "" (still); ``reverse`` names the opposite
        direction (the counterfactual captions that test whether a model reads the direction words)."""
        words = []
        for k in range(int(self.start.count[i])):
            vx, vy = self.velocity[i, k]
            if vx or vy:
                words.append(f"moving {direction_word(np.degrees(np.arctan2(-vy, vx)) + 180.0 * reverse)}")
            else:
                words.append("spinning" if self.spin[i, k] else "")
        return words


def draw_motion(rng: np.random.Generator, layouts: scenes_v2.Layouts, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(velocity, spin) per object: arrows move along their heading, other shapes in one of the eight named
    directions; some spin in place or stay still. Speeds are capped so the whole path fits in the frame."""
    n, k = layouts.shape.shape
    arrow = layouts.shape == SHAPES.index("arrow")
    direction = np.where(arrow, layouts.heading, 45.0 * rng.integers(0, 8, (n, k)))
    scale = layouts.size / scenes_v2.SIZE
    room = layouts.size / 2 - layouts.radius - MARGIN * scale  # how far a centre may go from the middle
    speed = np.minimum(rng.uniform(*SPEED, (n, k)) * scale, 2 * room / max(1, frames - 1))
    spins = np.isin(layouts.shape, [SHAPES.index(s) for s in ("square", "star", "triangle")])
    spinning = spins & (rng.random((n, k)) < SPIN_SHARE)
    still = rng.random((n, k)) < STILL_SHARE
    speed = np.where(spinning | still, 0.0, speed)
    angle = np.radians(direction)
    velocity = np.stack([np.cos(angle), -np.sin(angle)], -1) * speed[..., None]
    spin = np.where(spinning, rng.uniform(*SPIN, (n, k)) * rng.choice([-1.0, 1.0], (n, k)), 0.0)
    return velocity, spin


def fit_paths(middle: np.ndarray, velocity: np.ndarray, radius: np.ndarray, frames: int, size: int) -> np.ndarray:
    """Frame-0 centres of paths through ``middle`` (at the clip's middle frame), slid the least needed to keep
    every frame's bounding disc inside the image."""
    half = velocity * (frames - 1) / 2
    low = radius[..., None] + MARGIN * size / scenes_v2.SIZE + np.abs(half)
    return np.clip(middle, low, size - low) - half


def sample_clips(n: int, seed: int | tuple[int, ...], frames: int = FRAMES, size: int = scenes_v2.SIZE) -> Clips:
    """``n`` clips for ``seed`` (the same seed always gives the same clips); scenes as ``scenes_v2.sample_layouts``."""
    layouts = scenes_v2.sample_layouts(n, seed, size)
    velocity, spin = draw_motion(np.random.default_rng((*np.atleast_1d(seed), 7)), layouts, frames)
    start = dataclasses.replace(layouts, center=fit_paths(layouts.center, velocity, layouts.radius, frames, size))
    return Clips(start, velocity, spin, frames)


def clip_caption(clips: Clips, i: int, rng: np.random.Generator, reverse: bool = False) -> str:
    """A v2 caption variant for clip ``i`` with each object's motion (``reverse``: the opposite) after its phrase."""
    return scenes_v2.caption(clips.start, i, rng, suffixes=clips.motion_words(i, reverse))


def render_clips(clips: Clips, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(videos [batch, frames, 3, size, size] in [0, 1], coverage [batch, frames, objects, size, size])."""
    images, coverage = scenes_v2.render_layouts(clips.all_frames(), device)
    return images.unflatten(0, (len(clips), clips.frames)), coverage.unflatten(0, (len(clips), clips.frames))


def motion_prompts() -> list[str]:
    """Sample prompts: one object per motion (a circle each way, arrows along their heading, a spinning square)."""
    prompts = [f"a red circle moving {word}" for word in DIRECTIONS[::2]]
    prompts += [f"a green arrow pointing {word} moving {word}" for word in DIRECTIONS[1::2]]
    return prompts + ["a blue square spinning", "a red circle moving right and a blue square moving left"]


def stated_motion(prompt: str, frames: np.ndarray, tolerance: float = 60.0) -> dict[str, float] | None:
    """A quick read of a sample whose prompt names one moving object ([frames, H, W, 3] uint8), from the centroid of
    the pixels near its colour: ``shift``, pixels moved first frame to last along the direction the prompt names
    (training clips: 15-45), and ``step``, the median centroid jump between frames (1-3 for smooth motion; frames
    drawn independently jump tens of pixels). None for other prompts or frames without that colour. Not a scorer."""
    match = re.fullmatch(r"an? (\w+) \w+(?: pointing [\w-]+)? moving ([\w-]+)", prompt)
    if match is None or match[1] not in PALETTE:
        return None
    near = np.linalg.norm(frames.astype(np.float32) - np.array(PALETTE[match[1]], np.float32), axis=-1) < tolerance
    if not near.any((1, 2)).all():
        return None
    track = np.stack([np.argwhere(mask).mean(0)[::-1] for mask in near])  # (x, y) per frame, y down
    angle = np.radians(45.0 * DIRECTIONS.index(match[2]))
    shift = (track[-1] - track[0]) @ np.array([np.cos(angle), -np.sin(angle)])
    step = np.median(np.linalg.norm(np.diff(track, axis=0), axis=-1))
    return {"shift": round(float(shift), 2), "step": round(float(step), 2)}
