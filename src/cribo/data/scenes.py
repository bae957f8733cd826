"""Built-in synthetic scenes: seeded, procedurally drawn scene images with per-pixel class labels.

Each image holds several objects on a background. What defines an object's class is chosen by ``class_cue``:

* ``"shape"`` (the default): the class is the object's SHAPE (disc, square, triangle, star, ring, cross, ...);
  size, rotation, position, colours and texture (flat, stripes, checkerboard, dots, noise, gradient) are drawn
  per instance independently of the class, and the background draws its texture from the same family, so only
  the outline tells the class.
* ``"texture"``: the class is a PATTERN on the object's surface (stripes, checker, dots, concentric rings about
  the object's centre, radial spokes, a grid of lines), each covering half of the surface with each of its two
  colours; the colours (uniform random, or two of a small fixed ``PALETTE``, optionally shifted per instance
  within the pretraining views' colour-jitter ranges), the period, phase and orientation of the pattern and the
  outline are drawn per instance independently of the class, on a smooth background (flat, gradient,
  low-frequency noise) of random colours, or one grey.
* ``"silhouette"``: the class is the outline, as with ``"shape"``, but each object is one flat colour (a
  palette entry, jittered) on a smooth background: only the silhouette tells the class, and it is clean.

The last two were built for issue 13 (a CPU regime where training visibly learns the classes); in the runs of
that search (BENCHMARKS.md, "search for a CPU learning regime") a few hundred CPU-sized steps left the dense
features of all of them no better than a random initialisation, while on the ``"shape"`` scenes they improved,
so ``"shape"`` stays the default.

Objects overlap; the mask shows the top one. Everything is generated lazily from ``(seed, split, index)``: no
download, no cache, the same bytes on every call. Geometry and appearance use two independent random streams,
so restricting ``textures`` (``"shape"`` cue, e.g. to ``("flat",)`` for a debugging view) keeps every
object's class, position and outline.

Axis letters: H image height, W image width (pixels), 3 RGB channels; h, w a sub-window of the image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

__all__ = ["PALETTE", "PATTERNS", "SHAPES", "TEXTURES", "Scene", "SceneObject", "SyntheticScenes"]

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
Array = np.ndarray
ShapeFn = Callable[[Array, Array, float], Array]

BACKGROUND_NAME = "background"  # class 0, as in Pascal VOC
# Texture scales (stripe period, checker cell, dot spacing, noise cell) are given at this reference image
# size and scaled with the image, so a 224 px scene looks like a 96 px scene drawn finer.
REFERENCE_SIZE = 96
TEXTURE_SCALE_PX = (3.0, 12.0)  # pixel range of texture periods at REFERENCE_SIZE (our choice)
PLACEMENT_TRIES = 12  # attempts to place one object before it is dropped (our choice)


# --------------------------------------------------------------------------------------------------------
# Shapes: boolean membership in object coordinates (u, v) scaled so the shape's outer radius is about 1.
# ``detail`` in [0, 1) is a per-instance draw that each shape maps to its own structural parameter.
# --------------------------------------------------------------------------------------------------------
def _disc(u: Array, v: Array, detail: float) -> Array:
    return u * u + v * v <= 1.0


def _square(u: Array, v: Array, detail: float) -> Array:
    aspect = 0.75 + 0.25 * detail  # squares and mildly oblong rectangles
    return (np.abs(u) <= 0.78) & (np.abs(v) <= 0.78 * aspect)


def _triangle(u: Array, v: Array, detail: float) -> Array:
    inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for k in range(3):  # equilateral, circumradius 1, inradius 1/2
        angle = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _star(u: Array, v: Array, detail: float) -> Array:
    points, inner = 5, 0.38 + 0.12 * detail
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.minimum(phi, sector - phi)  # fold onto [0, sector/2]: outer vertex at 0, inner vertex at sector/2
    r = np.sqrt(u * u + v * v)
    x, y = r * np.cos(phi), r * np.sin(phi)
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # Inside when on the origin's side of the edge from the outer vertex (1, 0) to the inner vertex (bx, by).
    return (bx - 1.0) * y - by * (x - 1.0) >= 0.0


def _ring(u: Array, v: Array, detail: float) -> Array:
    inner = 0.45 + 0.2 * detail
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= inner * inner)


def _cross(u: Array, v: Array, detail: float) -> Array:
    half_width = 0.22 + 0.12 * detail
    au, av = np.abs(u), np.abs(v)
    return ((au <= half_width) & (av <= 1.0)) | ((av <= half_width) & (au <= 1.0))


def _crescent(u: Array, v: Array, detail: float) -> Array:
    offset = 0.45 + 0.2 * detail
    return (u * u + v * v <= 1.0) & ((u - offset) ** 2 + v * v > 0.85**2)


def _bar(u: Array, v: Array, detail: float) -> Array:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22 + 0.1 * detail)


# Class order = label order (class k + 1). The first six are the default classes.
SHAPES: dict[str, ShapeFn] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "crescent": _crescent,
    "bar": _bar,
}
DEFAULT_NUM_OBJECT_CLASSES = 6


# --------------------------------------------------------------------------------------------------------
# Textures: (h, w, 3) float colour fields on pixel coordinates x (1, w), y (h, 1).
# --------------------------------------------------------------------------------------------------------
def _rotated(x: Array, y: Array, angle: float) -> tuple[Array, Array]:
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, y * c - x * s


def _mix(weight: Array, first: Array, second: Array) -> Array:
    """Blend two colours (3,) with a weight field (h, w) in [0, 1] -> (h, w, 3)."""
    return first + weight[..., None] * (second - first)


def _value_noise(x: Array, y: Array, cell: float, rng: np.random.Generator) -> Array:
    """Smooth noise in [0, 1]: random values on a grid of ``cell`` pixels, bilinearly interpolated."""
    gx, gy = (x - x.min()) / cell, (y - y.min()) / cell
    grid = rng.random((int(gy.max()) + 2, int(gx.max()) + 2))
    ix, iy = gx.astype(np.intp), gy.astype(np.intp)
    fx, fy = gx - ix, gy - iy
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture(kind: str, x: Array, y: Array, scale: float, rng: np.random.Generator) -> Array:
    """Draw one texture of ``kind`` with random colours, angle, period and phase.

    Args:
        kind: one of ``TEXTURES``.
        x: (1, w) pixel-centre x coordinates.
        y: (h, 1) pixel-centre y coordinates.
        scale: pixels per reference pixel (image_size / REFERENCE_SIZE).
        rng: the appearance stream.

    Returns:
        (h, w, 3) float64 colours in [0, 255].
    """
    first, second = rng.uniform(0.0, 255.0, size=3), rng.uniform(0.0, 255.0, size=3)
    angle = rng.uniform(0.0, 2 * np.pi)
    period = max(2.0, scale * rng.uniform(*TEXTURE_SCALE_PX))
    u, v = _rotated(x, y, angle)
    shape = np.broadcast_shapes(x.shape, y.shape)
    if kind == "flat":
        return np.broadcast_to(first, (*shape, 3))
    if kind == "stripes":
        duty = rng.uniform(0.3, 0.7)
        return _mix(np.mod(u / period + rng.random(), 1.0) < duty, first, second)
    if kind == "checkerboard":
        parity = (np.floor(u / period) + np.floor(v / period)) % 2
        return _mix(parity, first, second)
    if kind == "dots":
        spacing, radius = 1.5 * period, rng.uniform(0.2, 0.4)
        du, dv = np.mod(u / spacing, 1.0) - 0.5, np.mod(v / spacing, 1.0) - 0.5
        return _mix(du * du + dv * dv <= radius * radius, first, second)
    if kind == "noise":
        return _mix(_value_noise(np.broadcast_to(x, shape), np.broadcast_to(y, shape), period, rng), first, second)
    if kind == "gradient":
        low, high = u.min(), u.max()
        return _mix(np.broadcast_to((u - low) / max(high - low, 1e-6), shape), first, second)
    raise ValueError(f"texture must be one of {TEXTURES}, got {kind!r}")


TEXTURES: tuple[str, ...] = ("flat", "stripes", "checkerboard", "dots", "noise", "gradient")


# --------------------------------------------------------------------------------------------------------
# Class patterns (``class_cue="texture"``): a weight field in [0, 1] that mixes the instance's two colours.
# Arguments: u, v pixel offsets from the object's centre along its (random) orientation, (h, w) each after
# broadcasting; ``period`` in pixels; ``phase`` in [0, 1). Periods are drawn per instance from
# ``PATTERN_PERIOD_PX`` (scaled with the image), so every pattern spans about one ViT patch of 8 px.
# --------------------------------------------------------------------------------------------------------
PATTERN_PERIOD_PX = (4.0, 6.5)  # pattern period at REFERENCE_SIZE (our choice: 1.2-2 periods per 8-px patch)
SPOKES_PER_TURN = (6, 10)  # inclusive range of the spokes pattern's sector pairs (our choice)
# Every pattern covers half of its area with each colour, so the mean colour of a patch does not tell the class:
LINE_WIDTH = 1.0 - 0.5**0.5  # grid: line width / period; the lines cover 1 - (1 - w)^2 = 1/2
DOT_RADIUS = (0.5 / np.pi) ** 0.5  # dots: dot radius / spacing; the dots cover pi r^2 = 1/2
MIN_PATTERN_CONTRAST = 110.0  # Euclidean RGB distance between an instance's two colours, 0..441 (our choice)
COLOUR_TRIES = 16  # colour pairs drawn to find one with that contrast (our choice)
# Pattern colours with ``palette_size`` > 0: the first n of these (our choice: saturated and far apart in RGB), the
# same for every split and seed, each instance taking two distinct ones. A small palette makes colour a poor cue
# of which instance is which, so that what tells objects apart across views is their pattern.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 40, 40),
    (40, 90, 230),
    (250, 220, 40),
    (30, 30, 30),
    (240, 240, 240),
    (40, 180, 70),
    (200, 60, 220),
    (250, 140, 20),
)


def _stripes_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    return np.broadcast_to(np.mod(u / period + phase, 1.0) < 0.5, np.broadcast_shapes(u.shape, v.shape))


def _checker_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    cell = period / 2  # one period = two cells
    return (np.floor(u / cell + phase) + np.floor(v / cell + phase)) % 2 == 0


def _dots_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    du, dv = np.mod(u / period + phase, 1.0) - 0.5, np.mod(v / period + phase, 1.0) - 0.5
    return du * du + dv * dv <= DOT_RADIUS * DOT_RADIUS


def _rings_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    return np.mod(np.sqrt(u * u + v * v) / period + phase, 1.0) < 0.5


def _spokes_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    low, high = SPOKES_PER_TURN  # the period's position in its range picks the number of spokes
    span = PATTERN_PERIOD_PX[1] - PATTERN_PERIOD_PX[0]
    fraction = float(np.clip((period - PATTERN_PERIOD_PX[0]) / span, 0.0, 1.0)) if span > 0 else 0.0
    spokes = low + round(fraction * (high - low))
    return np.mod(np.arctan2(v, u) * spokes / (2 * np.pi) + phase, 1.0) < 0.5


def _grid_pattern(u: Array, v: Array, period: float, phase: float) -> Array:
    return (np.mod(u / period + phase, 1.0) < LINE_WIDTH) | (np.mod(v / period + phase, 1.0) < LINE_WIDTH)


PatternFn = Callable[[Array, Array, float, float], Array]
# Class order = label order (class k + 1) of the "texture" cue.
PATTERNS: dict[str, PatternFn] = {
    "stripes": _stripes_pattern,
    "checker": _checker_pattern,
    "dots": _dots_pattern,
    "rings": _rings_pattern,
    "spokes": _spokes_pattern,
    "grid": _grid_pattern,
}
# Backgrounds of the "texture" cue: smooth fields, none of which is a class pattern.
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise")
BACKGROUND_NOISE_CELL_PX = (14.0, 28.0)  # cell of the background's value noise at REFERENCE_SIZE (our choice)
ClassCue = Literal["texture", "shape", "silhouette"]
PLAIN_BACKGROUND = (128.0, 128.0, 128.0)  # the one background colour with plain_background (our choice)
# Outlines of the "texture" cue, drawn per instance independently of the class (compact shapes, so that the
# pattern fills whole patches).
OUTLINES: tuple[str, ...] = ("disc", "square", "triangle", "star")


@dataclass(frozen=True)
class CueLayout:
    """How many objects, how large and how hidden, by default, for one class cue."""

    objects_per_image: tuple[int, int]
    object_size: tuple[float, float]  # outer radius as a fraction of the image side
    max_occlusion: float
    palette_size: int = 0  # object colours (texture and silhouette cues): 0 uniform random, n the first n of PALETTE
    colour_jitter: float = 0.0  # per-instance photometric variation of the pattern colours (texture cue), 0..1
    period_px: tuple[float, float] = PATTERN_PERIOD_PX  # pattern period range at REFERENCE_SIZE (texture cue)
    plain_background: bool = False  # texture cue: every background one grey (PLAIN_BACKGROUND) instead of random


CUE_LAYOUTS: dict[str, CueLayout] = {
    # Several objects of shared classes per scene (issue 13), each about 3-6 patches of 8 px across at 96 px.
    "texture": CueLayout(objects_per_image=(4, 6), object_size=(0.14, 0.26), max_occlusion=0.3),
    # The pre-issue-13 scenes, unchanged.
    "shape": CueLayout(objects_per_image=(3, 5), object_size=(0.12, 0.26), max_occlusion=0.4),
    # Flat silhouettes: the outline is the class, the fill one jittered palette colour, the background smooth.
    "silhouette": CueLayout(
        objects_per_image=(4, 6), object_size=(0.14, 0.26), max_occlusion=0.3, palette_size=4, colour_jitter=1.0
    ),
}


def _smooth_field(kind: str, x: Array, y: Array, scale: float, rng: np.random.Generator) -> Array:
    """A background of the "texture" cue: flat, a linear gradient or low-frequency value noise in two random
    colours; x (1, w), y (h, 1) pixel-centre coordinates -> (h, w, 3) float64 in [0, 255]."""
    first, second = rng.uniform(0.0, 255.0, size=3), rng.uniform(0.0, 255.0, size=3)
    shape = np.broadcast_shapes(x.shape, y.shape)
    if kind == "flat":
        return np.broadcast_to(first, (*shape, 3))
    if kind == "gradient":
        u, _ = _rotated(x, y, rng.uniform(0.0, 2 * np.pi))
        low, high = u.min(), u.max()
        return _mix(np.broadcast_to((u - low) / max(high - low, 1e-6), shape), first, second)
    if kind == "noise":
        cell = scale * rng.uniform(*BACKGROUND_NOISE_CELL_PX)
        return _mix(_value_noise(np.broadcast_to(x, shape), np.broadcast_to(y, shape), cell, rng), first, second)
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")


# Per-instance photometric variation at colour_jitter = 1: the ranges of the pretraining views' colour jitter
# (augment.py: brightness and contrast 0.4, saturation 0.2, hue 0.1 of a turn), so that the invariance the
# cross-view terms learn is the one that tells two instances of a class apart.
JITTER_BRIGHTNESS = 0.4
JITTER_CONTRAST = 0.4
JITTER_SATURATION = 0.2
JITTER_HUE = 0.1
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma weights of (R, G, B)


def _jittered(colours: tuple[Array, Array], rng: np.random.Generator, strength: float) -> tuple[Array, Array]:
    """Shift an instance's two colours (3,) together: hue rotation about the grey axis, saturation, contrast
    (about the pair's mean luma) and brightness factors drawn within ``strength`` times the jitter ranges."""
    if strength <= 0:
        return colours
    pair = np.stack(colours)  # (2, 3)
    hue, sat, con, bri = rng.uniform(-1.0, 1.0, size=4) * strength
    angle = 2 * np.pi * JITTER_HUE * hue
    axis = np.ones(3) / np.sqrt(3.0)
    cos, sin = np.cos(angle), np.sin(angle)
    pair = pair * cos + np.cross(axis, pair) * sin + axis * (pair @ axis)[:, None] * (1 - cos)  # Rodrigues
    luma = (pair @ LUMA)[:, None]
    pair = luma + (1 + JITTER_SATURATION * sat) * (pair - luma)
    pair = luma.mean() + (1 + JITTER_CONTRAST * con) * (pair - luma.mean())
    pair = np.clip(pair * (1 + JITTER_BRIGHTNESS * bri), 0.0, 255.0)
    return pair[0], pair[1]


def _pattern_colours(rng: np.random.Generator, palette_size: int) -> tuple[Array, Array]:
    """The two colours (3,) of one instance's pattern: two distinct entries of the first ``palette_size`` of
    ``PALETTE`` in random order, or (``palette_size`` 0) two uniform random RGB colours at least
    ``MIN_PATTERN_CONTRAST`` apart (the first such of ``COLOUR_TRIES`` draws; the most distant one if none is)."""
    if palette_size == 1:
        return np.asarray(PALETTE[0], dtype=np.float64), np.asarray(PALETTE[0], dtype=np.float64)
    if palette_size > 0:
        first, second = rng.choice(palette_size, size=2, replace=False)
        return np.asarray(PALETTE[first], dtype=np.float64), np.asarray(PALETTE[second], dtype=np.float64)
    pairs = rng.uniform(0.0, 255.0, size=(COLOUR_TRIES, 2, 3))
    distance = np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=-1)
    far = np.flatnonzero(distance >= MIN_PATTERN_CONTRAST)
    pick = int(far[0]) if len(far) else int(np.argmax(distance))
    return pairs[pick, 0], pairs[pick, 1]


# --------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its class (1..C), placement and texture.

    Attributes:
        class_index: label in the mask (1..C).
        centre: (x, y) in pixels.
        radius: outer radius in pixels.
        angle: rotation in radians.
        detail: per-instance structural parameter in [0, 1) (ring thickness, star depth, ...).
        texture: texture name (set by the appearance stream; empty before); the class pattern's name under the
            ``"texture"`` cue.
        outline: name of the outline in ``SHAPES`` (the class's shape under the ``"shape"`` cue).
    """

    class_index: int
    centre: tuple[float, float]
    radius: float
    angle: float
    detail: float
    texture: str = ""
    outline: str = ""


@dataclass(frozen=True)
class Scene:
    """A generated scene with everything known about it.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8 class labels, 0 = background.
        instances: (H, W) int16, 0 = background, k = ``objects[k - 1]`` (drawing order, later on top).
        objects: the placed objects in drawing order.
        background_texture: texture name of the background.
    """

    image: Array
    mask: Array
    instances: Array
    objects: tuple[SceneObject, ...]
    background_texture: str


def _split_key(split: str) -> int:
    """A stable 64-bit integer for a split name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")


def _bounding_window(centre: tuple[float, float], radius: float, size: int) -> tuple[slice, slice]:
    cx, cy = centre
    rows = slice(max(0, int(np.floor(cy - radius))), min(size, int(np.ceil(cy + radius)) + 1))
    cols = slice(max(0, int(np.floor(cx - radius))), min(size, int(np.ceil(cx + radius)) + 1))
    return rows, cols


def _shape_window(obj: SceneObject, shape_fn: ShapeFn, coords: Array, size: int) -> tuple[tuple[slice, slice], Array]:
    """Rasterise one object: its bounding window and the (h, w) boolean membership inside it."""
    rows, cols = _bounding_window(obj.centre, obj.radius, size)
    x = coords[None, cols] - obj.centre[0]
    y = coords[rows, None] - obj.centre[1]
    u, v = _rotated(x, y, obj.angle)
    return (rows, cols), shape_fn(u / obj.radius, v / obj.radius, obj.detail)


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a pair (min, max) with {low} <= min <= max <= {high}, got {value!r}")
    return (value[0], value[1])


class SyntheticScenes:
    """Procedural scene-centric images with per-pixel labels, deterministic from (seed, split, index).

    Args:
        split: "train" or "val"; the splits draw from disjoint seeds.
        num_images: dataset length (>= 0); images are generated on access.
        image_size: side of the square images in pixels (>= 16).
        seed: base seed (>= 0).
        class_cue: what defines an object's class: ``"shape"`` (its outline, ``SHAPES``), ``"texture"`` (its
            surface pattern, ``PATTERNS``) or ``"silhouette"`` (its outline, filled flat); see the module docstring.
        num_object_classes: number of classes, the first ones of ``PATTERNS`` (texture) or ``SHAPES``.
        objects_per_image: inclusive range of objects attempted per image (None: the cue's default).
        object_size: range of the object outer radius as a fraction of ``image_size`` (None: the cue's default).
        textures: ``"shape"`` cue: texture family used for both objects and background (subset of ``TEXTURES``);
            the ``"texture"`` cue paints class patterns on smooth backgrounds and ignores it.
        max_occlusion: largest fraction of an object's area that later objects may cover (0..1; None: the
            cue's default).
        pixel_noise: standard deviation of Gaussian noise added to every pixel (0..255 scale).
        palette_size: ``"texture"`` and ``"silhouette"`` cues: the objects' colours come from the first n colours
            of ``PALETTE`` (1..len(PALETTE); 1 paints every object one colour), or are uniform random with 0
            (None: the cue's default).
        colour_jitter: per-instance variation of the palette colours, 0..1 (None: the cue's default).
        period_px: ``"texture"`` cue: range of the pattern period in pixels at ``REFERENCE_SIZE`` (None: the
            cue's default).
        plain_background: ``"texture"`` cue: one grey background for every image (None: the cue's default).
    """

    def __init__(
        self,
        split: Split,
        num_images: int,
        image_size: int = 96,
        seed: int = 0,
        *,
        class_cue: ClassCue = "shape",
        num_object_classes: int = DEFAULT_NUM_OBJECT_CLASSES,
        objects_per_image: tuple[int, int] | None = None,
        object_size: tuple[float, float] | None = None,
        textures: Sequence[str] = TEXTURES,
        max_occlusion: float | None = None,
        pixel_noise: float = 3.0,
        palette_size: int | None = None,
        colour_jitter: float | None = None,
        period_px: tuple[float, float] | None = None,
        plain_background: bool | None = None,
    ) -> None:
        if class_cue not in get_args(ClassCue):
            raise ValueError(f"class_cue must be one of {get_args(ClassCue)}, got {class_cue!r}")
        layout = CUE_LAYOUTS[class_cue]
        objects_per_image = layout.objects_per_image if objects_per_image is None else objects_per_image
        object_size = layout.object_size if object_size is None else object_size
        max_occlusion = layout.max_occlusion if max_occlusion is None else max_occlusion
        palette_size = layout.palette_size if palette_size is None else palette_size
        colour_jitter = layout.colour_jitter if colour_jitter is None else colour_jitter
        period_px = layout.period_px if period_px is None else period_px
        plain_background = layout.plain_background if plain_background is None else plain_background
        if not 0 <= palette_size <= len(PALETTE):
            raise ValueError(f"palette_size must be in 0..{len(PALETTE)}, got {palette_size}")
        names = tuple(PATTERNS) if class_cue == "texture" else tuple(SHAPES)  # shape and silhouette: outlines
        if split not in get_args(Split):
            raise ValueError(f"split must be one of {get_args(Split)}, got {split!r}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 1 <= num_object_classes <= len(names):
            raise ValueError(
                f"num_object_classes must be in 1..{len(names)} for class_cue={class_cue!r}, got {num_object_classes}"
            )
        if len(objects_per_image) != 2 or not 1 <= objects_per_image[0] <= objects_per_image[1]:
            raise ValueError(
                f"objects_per_image must be a pair (min, max) with 1 <= min <= max, got {objects_per_image}"
            )
        unknown = [t for t in textures if t not in TEXTURES]
        if not textures or unknown:
            raise ValueError(f"textures must be a non-empty subset of {TEXTURES}, got {tuple(textures)!r}")
        if not 0.0 <= max_occlusion <= 1.0:
            raise ValueError(f"max_occlusion must be in [0, 1], got {max_occlusion}")
        if pixel_noise < 0:
            raise ValueError(f"pixel_noise must be >= 0, got {pixel_noise}")
        self.split: Split = split
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.class_cue: ClassCue = class_cue
        self.object_names: tuple[str, ...] = names[:num_object_classes]
        self.objects_per_image = (int(objects_per_image[0]), int(objects_per_image[1]))
        self.object_size = _check_range("object_size", object_size, 1.0 / image_size, 1.0)
        self.textures = tuple(textures)
        self.max_occlusion = float(max_occlusion)
        self.pixel_noise = float(pixel_noise)
        self.palette_size = int(palette_size)
        self.colour_jitter = float(colour_jitter)
        self.period_px = (float(period_px[0]), float(period_px[1]))
        self.plain_background = bool(plain_background)
        centres = np.arange(self.image_size, dtype=np.float64) + 0.5
        self._coords = centres  # pixel-centre coordinates, shared by x and y

    # ---- dataset protocol ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of labels including background (class 0)."""
        return len(self.object_names) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label names, index = class value in the mask."""
        return (BACKGROUND_NAME, *self.object_names)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Image.Image, Array]:
        """Return (RGB PIL image, (H, W) uint8 mask) of scene ``index``."""
        scene = self.scene(index)
        return Image.fromarray(scene.image), scene.mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_images={self.num_images}, "
            f"image_size={self.image_size}, seed={self.seed}, class_cue={self.class_cue!r}, "
            f"classes={list(self.class_names)}, "
            f"objects_per_image={self.objects_per_image}, object_size={self.object_size}, "
            f"textures={list(self.textures)}, max_occlusion={self.max_occlusion}, pixel_noise={self.pixel_noise}, "
            f"palette_size={self.palette_size})"
        )

    def stem(self, index: int) -> str:
        """File stem of scene ``index`` in ``write_to_disk``."""
        return f"{self.split}_{self._check_index(index):06d}"

    # ---- generation ------------------------------------------------------------------------------------
    def scene(self, index: int) -> Scene:
        """Generate scene ``index`` with its instance map and object list (a superset of ``__getitem__``)."""
        index = self._check_index(index)
        root = np.random.SeedSequence([self.seed, _split_key(self.split), index])
        geometry_seed, appearance_seed = root.spawn(2)
        objects, instances = self._place_objects(np.random.default_rng(geometry_seed))
        appearance = np.random.default_rng(appearance_seed)
        image, objects, background = self._paint(objects, instances, appearance)
        lookup = np.array([0, *(o.class_index for o in objects)], dtype=np.uint8)
        return Scene(image, lookup[instances], instances, objects, background)

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return int(index) % self.num_images

    def _sample_object(self, rng: np.random.Generator) -> SceneObject:
        size = self.image_size
        radius = size * rng.uniform(*self.object_size)
        margin = 0.6 * radius  # centres keep most of the object inside the frame
        low, high = min(margin, size / 2), max(size - margin, size / 2)
        class_index = int(rng.integers(1, self.num_classes))
        obj = SceneObject(
            class_index=class_index,
            centre=(float(rng.uniform(low, high)), float(rng.uniform(low, high))),
            radius=float(radius),
            angle=float(rng.uniform(0.0, 2 * np.pi)),
            detail=float(rng.random()),
        )
        if self.class_cue != "texture":
            return replace(obj, outline=self.object_names[class_index - 1])
        return replace(obj, outline=OUTLINES[int(rng.integers(len(OUTLINES)))])

    def _place_objects(self, rng: np.random.Generator) -> tuple[tuple[SceneObject, ...], Array]:
        """Drop objects one on top of the other, rejecting placements that hide too much of earlier ones.

        Returns:
            The placed objects and the (H, W) int16 instance map (0 background, k = k-th placed object).
        """
        size = self.image_size
        instances = np.zeros((size, size), dtype=np.int16)
        full_area: list[int] = [0]  # per instance id, its area when it was drawn (id 0 unused)
        placed: list[SceneObject] = []
        for _ in range(int(rng.integers(self.objects_per_image[0], self.objects_per_image[1] + 1))):
            for _ in range(PLACEMENT_TRIES):
                obj = self._sample_object(rng)
                window, inside = _shape_window(obj, SHAPES[obj.outline], self._coords, size)
                area = int(inside.sum())
                visible = np.bincount(instances.ravel(), minlength=len(full_area))
                hidden = np.bincount(instances[window][inside], minlength=len(full_area))
                remaining = visible[1:] - hidden[1:]
                if np.any(remaining < (1.0 - self.max_occlusion) * np.asarray(full_area[1:])):
                    continue
                instances[window][inside] = len(full_area)
                full_area.append(area)
                placed.append(obj)
                break
        return tuple(placed), instances

    def _paint(
        self, objects: tuple[SceneObject, ...], instances: Array, rng: np.random.Generator
    ) -> tuple[Array, tuple[SceneObject, ...], str]:
        """Paint the background and every visible object; add pixel noise; return uint8 (H, W, 3)."""
        if self.class_cue == "texture":
            image, painted, background = self._paint_patterns(objects, instances, rng)
        elif self.class_cue == "silhouette":
            image, painted, background = self._paint_silhouettes(objects, instances, rng)
        else:
            image, painted, background = self._paint_textures(objects, instances, rng)
        if self.pixel_noise > 0:
            image += rng.normal(0.0, self.pixel_noise, size=image.shape)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), painted, background

    def _background(self, rng: np.random.Generator) -> tuple[Array, str]:
        """The background of the ``"texture"`` and ``"silhouette"`` cues: a smooth random field (or the plain
        colour with ``plain_background``, drawn all the same so that the objects' draws do not change); float64
        (H, W, 3) in [0, 255] and its name."""
        x, y = self._coords[None, :], self._coords[:, None]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        image = np.array(_smooth_field(background, x, y, self.image_size / REFERENCE_SIZE, rng), dtype=np.float64)
        if self.plain_background:
            background = "plain"
            image[...] = PLAIN_BACKGROUND
        return image, background

    def _paint_patterns(
        self, objects: tuple[SceneObject, ...], instances: Array, rng: np.random.Generator
    ) -> tuple[Array, tuple[SceneObject, ...], str]:
        """``"texture"`` cue: a smooth background, each object filled with its class pattern in two random
        colours; returns float64 (H, W, 3) in [0, 255] before noise, the painted objects and the background."""
        size = self.image_size
        scale = size / REFERENCE_SIZE
        x, y = self._coords[None, :], self._coords[:, None]
        image, background = self._background(rng)
        painted: list[SceneObject] = []
        for instance_id, obj in enumerate(objects, start=1):
            name = self.object_names[obj.class_index - 1]
            first, second = _jittered(_pattern_colours(rng, self.palette_size), rng, self.colour_jitter)
            period = scale * rng.uniform(*self.period_px)
            phase, turn = float(rng.random()), float(rng.uniform(0.0, 2 * np.pi))
            rows, cols = _bounding_window(obj.centre, obj.radius, size)
            u, v = _rotated(x[:, cols] - obj.centre[0], y[rows, :] - obj.centre[1], turn)
            weight = PATTERNS[name](u, v, period, phase).astype(np.float64)
            visible = instances[rows, cols] == instance_id
            image[rows, cols][visible] = _mix(weight, first, second)[visible]
            painted.append(replace(obj, texture=name))
        return image, tuple(painted), background

    def _paint_silhouettes(
        self, objects: tuple[SceneObject, ...], instances: Array, rng: np.random.Generator
    ) -> tuple[Array, tuple[SceneObject, ...], str]:
        """``"silhouette"`` cue: a smooth background, each object filled with one flat colour (a jittered palette
        entry); returns float64 (H, W, 3) in [0, 255] before noise, the painted objects and the background."""
        image, background = self._background(rng)
        painted: list[SceneObject] = []
        for instance_id, obj in enumerate(objects, start=1):
            fill, _ = _jittered(_pattern_colours(rng, self.palette_size), rng, self.colour_jitter)
            image[instances == instance_id] = fill
            painted.append(replace(obj, texture="flat"))
        return image, tuple(painted), background

    def _paint_textures(
        self, objects: tuple[SceneObject, ...], instances: Array, rng: np.random.Generator
    ) -> tuple[Array, tuple[SceneObject, ...], str]:
        """``"shape"`` cue: background and objects textured from the same family, independently of the class;
        returns float64 (H, W, 3) in [0, 255] before noise, the painted objects and the background texture."""
        size = self.image_size
        scale = size / REFERENCE_SIZE
        x, y = self._coords[None, :], self._coords[:, None]
        background = self.textures[int(rng.integers(len(self.textures)))]
        image = np.array(_texture(background, x, y, scale, rng), dtype=np.float64)
        painted: list[SceneObject] = []
        for instance_id, obj in enumerate(objects, start=1):
            kind = self.textures[int(rng.integers(len(self.textures)))]
            rows, cols = _bounding_window(obj.centre, obj.radius, size)
            colours = _texture(kind, x[:, cols], y[rows, :], scale, rng)
            visible = instances[rows, cols] == instance_id
            image[rows, cols][visible] = colours[visible]
            painted.append(replace(obj, texture=kind))
        return image, tuple(painted), background

    # ---- export ----------------------------------------------------------------------------------------
    def write_to_disk(self, root: str | Path) -> Path:
        """Write every scene as ``root/images/<stem>.png`` and its mask as ``root/masks/<stem>.png``.

        Masks are 8-bit grayscale ('L') PNGs holding the class index (the generic images/ + masks/ layout
        of the evaluation suite); ``root/class_names.txt`` lists the class names, one per line, in label order.

        Args:
            root: output folder (created if needed; existing files with the same names are overwritten).

        Returns:
            ``root`` as a Path.
        """
        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        for index in range(self.num_images):
            image, mask = self[index]
            stem = self.stem(index)
            image.save(root / "images" / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        (root / "class_names.txt").write_text("\n".join(self.class_names) + "\n", encoding="utf-8")
        logger.info("wrote %d synthetic %s scenes to %s", self.num_images, self.split, root)
        return root
