"""Rendering of the demo scenes: textured "stuff" regions with "things" drawn on top, and their label maps.

A class is defined by its texture or its shape, never by its colour: every instance draws its colours from
one shared distribution. Some things carry a thin border of label 0 ("other"). Labels are 0 = unlabelled and
class ``k`` (0-based) as ``k + 1``. :mod:`seg.data.synthetic` writes these scenes as a data set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["DEMO_CLASS_NAMES", "DEMO_STUFF", "DEMO_THINGS", "render_demo_sample"]

DEMO_STUFF: tuple[str, ...] = (
    "h-stripes",
    "v-stripes",
    "d-stripes",
    "checker",
    "dots",
    "bricks",
    "grass",
    "gradient",
)
DEMO_THINGS: tuple[str, ...] = ("disc", "triangle", "rectangle", "star")
DEMO_CLASS_NAMES: tuple[str, ...] = DEMO_STUFF + DEMO_THINGS

Array = np.ndarray
Rng = np.random.Generator
_PIXEL_MAX = float(np.iinfo(np.uint8).max)  # 8-bit RGB


# ----------------------------------------------------------------------------------------------------------
# Colours and smooth random fields


def _luma(rgb: Array) -> float:
    """Perceived brightness (8-bit scale) of one RGB colour."""
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colour_pair(rng: Rng, min_contrast: float = 80.0) -> tuple[Array, Array]:
    """Two random 8-bit RGB colours whose brightness differs by at least ``min_contrast``.

    Every class draws from this same distribution, so colour alone never identifies a class.
    """
    while True:
        c0, c1 = rng.uniform(0.0, _PIXEL_MAX, size=(2, 3))
        if abs(_luma(c0) - _luma(c1)) >= min_contrast:
            return c0.astype(np.float32), c1.astype(np.float32)


def _smooth_field(rng: Rng, height: int, width: int, cells: int) -> Array:
    """Low-frequency noise in [-1, 1] of shape (H, W): a random ``cells`` x ``cells`` grid, resized."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    field = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(field, dtype=np.float32)


def _rotated(xx: Array, yy: Array, angle: float) -> tuple[Array, Array]:
    """Coordinates (px) along and across the direction ``angle`` (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


# ----------------------------------------------------------------------------------------------------------
# Stuff textures: each returns a mixing weight in [0, 1] of shape (H, W) between an instance's two colours.
# Periods are 7-16 px, so a stride-4 encoder sees two to four tokens per period.


def _stripes(xx: Array, yy: Array, rng: Rng, angle: float) -> Array:
    """Parallel bands whose normal points at ``angle`` (radians), jittered by up to 8 degrees."""
    angle += np.deg2rad(rng.uniform(-8.0, 8.0))
    u, _ = _rotated(xx, yy, angle)
    period = rng.uniform(7.0, 16.0)
    duty = rng.uniform(0.35, 0.65)
    return (np.mod(u / period + rng.uniform(), 1.0) < duty).astype(np.float32)


def _h_stripes(xx: Array, yy: Array, rng: Rng) -> Array:
    """Horizontal bands (intensity varies along y)."""
    return _stripes(xx, yy, rng, np.pi / 2)


def _v_stripes(xx: Array, yy: Array, rng: Rng) -> Array:
    """Vertical bands (intensity varies along x)."""
    return _stripes(xx, yy, rng, 0.0)


def _d_stripes(xx: Array, yy: Array, rng: Rng) -> Array:
    """Diagonal bands, either diagonal."""
    return _stripes(xx, yy, rng, np.pi / 4 + np.pi / 2 * rng.integers(2))


def _checker(xx: Array, yy: Array, rng: Rng) -> Array:
    """Checkerboard of 4-8 px squares, rotated by up to 10 degrees."""
    u, v = _rotated(xx, yy, np.deg2rad(rng.uniform(-10.0, 10.0)))
    side = rng.uniform(4.0, 8.0)
    cells = np.floor(u / side + rng.uniform()) + np.floor(v / side + rng.uniform())
    return np.mod(cells, 2.0).astype(np.float32)


def _dots(xx: Array, yy: Array, rng: Rng) -> Array:
    """Round dots on a square or hexagonal lattice of period 8-16 px."""
    period = rng.uniform(8.0, 16.0)
    radius = period * rng.uniform(0.22, 0.35)
    u, v = _rotated(xx, yy, np.deg2rad(rng.uniform(-15.0, 15.0)))
    v = v / period + rng.uniform()  # in lattice rows; a row's dot centres sit at v = row + 0.5
    shift = 0.5 * np.mod(np.floor(v), 2.0) * rng.integers(2)  # hexagonal lattice: odd rows shifted
    du = (np.mod(u / period + shift + rng.uniform(), 1.0) - 0.5) * period
    dv = (np.mod(v, 1.0) - 0.5) * period
    return (du * du + dv * dv < radius * radius).astype(np.float32)


def _bricks(xx: Array, yy: Array, rng: Rng) -> Array:
    """Running-bond brick wall: 1-2 px mortar lines, 7-12 px rows, alternate rows offset by half a brick."""
    course = rng.uniform(7.0, 12.0)
    length = course * rng.uniform(1.8, 3.0)
    mortar = rng.uniform(1.2, 2.2)
    y = yy / course + rng.uniform()
    row = np.floor(y)
    x = xx / length + 0.5 * np.mod(row, 2.0) + rng.uniform()
    on_bed = np.mod(y, 1.0) * course < mortar
    on_head = np.mod(x, 1.0) * length < mortar
    return (on_bed | on_head).astype(np.float32)


def _grass(xx: Array, yy: Array, rng: Rng) -> Array:
    """Blade-like noise: thin, mostly vertical streaks 1-2 px wide and 5-10 px long."""
    height, width = xx.shape
    stretch_y, stretch_x = rng.uniform(5.0, 10.0), rng.uniform(1.0, 2.0)
    small = rng.uniform(0.0, 1.0, size=(int(height / stretch_y) + 2, int(width / stretch_x) + 2))
    field = Image.fromarray(small.astype(np.float32)).resize(
        (int(small.shape[1] * stretch_x), int(small.shape[0] * stretch_y)), Image.Resampling.BILINEAR
    )
    blades = np.asarray(field, dtype=np.float32)[:height, :width]
    return (blades > rng.uniform(0.45, 0.6)).astype(np.float32)


def _gradient(xx: Array, yy: Array, rng: Rng) -> Array:
    """Smooth ramp in a random direction plus soft low-frequency clouds: no texture at small scales."""
    height, width = xx.shape
    u, _ = _rotated(xx, yy, rng.uniform(0.0, 2.0 * np.pi))
    ramp = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    clouds = _smooth_field(rng, height, width, cells=int(rng.integers(3, 6)))
    return np.clip(0.75 * ramp + 0.25 * (clouds + 1.0) / 2.0, 0.0, 1.0)


_TEXTURES: tuple[Callable[[Array, Array, Rng], Array], ...] = (
    _h_stripes,
    _v_stripes,
    _d_stripes,
    _checker,
    _dots,
    _bricks,
    _grass,
    _gradient,
)


# ----------------------------------------------------------------------------------------------------------
# Thing shapes as signed distance fields (px; negative inside)


def _convex_sdf(xx: Array, yy: Array, vertices: Array) -> Array:
    """Signed distance (px, negative inside) to the convex polygon with (V, 2) vertices (x, y) in px."""
    centre = vertices.mean(axis=0)
    sdf = np.full(xx.shape, -np.inf, dtype=np.float32)
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        normal = np.array([b[1] - a[1], a[0] - b[0]], dtype=np.float32)
        normal /= np.linalg.norm(normal)
        if np.dot(normal, centre - a) > 0:  # make the normal point outwards
            normal = -normal
        sdf = np.maximum(sdf, (xx - a[0]) * normal[0] + (yy - a[1]) * normal[1])
    return sdf


def _polar(cx: float, cy: float, radius: Array, angle: Array) -> Array:
    """Points (V, 2) as (x, y) px at the given radii and angles around a centre."""
    return np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], axis=1)


def _shape_sdf(kind: str, xx: Array, yy: Array, cx: float, cy: float, size: float, rng: Rng) -> Array:
    """Signed distance (px) to a randomly rotated shape of circumradius ~``size`` px centred at (cx, cy)."""
    turn = rng.uniform(0.0, 2.0 * np.pi)
    if kind == "disc":
        return np.hypot(xx - cx, yy - cy) - size
    if kind == "triangle":
        angles = turn + np.arange(3) * 2.0 * np.pi / 3 + rng.uniform(-0.15, 0.15, size=3)
        return _convex_sdf(xx, yy, _polar(cx, cy, np.full(3, size), angles))
    if kind == "rectangle":
        half_w, half_h = size * 0.8, size * 0.8 * rng.uniform(0.45, 0.9)
        corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
        c, s = np.cos(turn), np.sin(turn)
        return _convex_sdf(xx, yy, corners @ np.array([[c, s], [-s, c]]) + np.array([cx, cy]))
    if kind == "star":  # five spikes around a pentagon, as a union of convex pieces
        outer = turn + np.arange(5) * 2.0 * np.pi / 5
        inner = _polar(cx, cy, np.full(5, 0.45 * size), outer + np.pi / 5)
        tips = _polar(cx, cy, np.full(5, size), outer)
        sdf = _convex_sdf(xx, yy, inner)
        for i in range(5):
            spike = np.stack([inner[i - 1], tips[i], inner[i]])
            sdf = np.minimum(sdf, _convex_sdf(xx, yy, spike))
        return sdf
    raise ValueError(f"unknown shape {kind!r}; expected one of {DEMO_THINGS}")


# ----------------------------------------------------------------------------------------------------------
# One sample


def _stuff_layout(rng: Rng, height: int, width: int, xx: Array, yy: Array, first: int) -> tuple[Array, list[int]]:
    """Split the image into 1-3 regions with wavy borders, the first one of stuff class ``first``.

    Returns:
        The region index map (H, W) and the stuff class of each region.
    """
    num_regions = int(rng.integers(1, 4))
    others = [c for c in range(len(DEMO_STUFF)) if c != first]
    classes = [first] + [int(c) for c in rng.choice(others, size=num_regions - 1, replace=False)]
    seeds = rng.uniform([0.0, 0.0], [width, height], size=(num_regions, 2))
    wobble = 20.0 * np.stack([_smooth_field(rng, height, width, cells=5) for _ in range(num_regions)])
    dist = np.hypot(xx[None] - seeds[:, 0, None, None], yy[None] - seeds[:, 1, None, None]) + wobble
    return np.argmin(dist, axis=0), classes


def render_demo_sample(rng: Rng, height: int, width: int, index: int | None = None) -> tuple[Array, Array]:
    """Draw one demo image and its label map.

    Args:
        rng: random generator; the sample is a pure function of its state and ``index``.
        height: image height in px.
        width: image width in px.
        index: position of the sample in its split. When given, stuff class ``index % 8`` gets a region and
            thing ``index % 4`` is drawn last (on top), so any 8 consecutive samples show every class.

    Returns:
        ``(image, label)``: uint8 RGB (H, W, 3) before JPEG compression, and uint8 (H, W) labels with
        0 = unlabelled and class ``k`` stored as ``k + 1`` (ADE20K convention).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    label = np.zeros((height, width), dtype=np.uint8)

    first_stuff = int(rng.integers(len(DEMO_STUFF))) if index is None else index % len(DEMO_STUFF)
    regions, classes = _stuff_layout(rng, height, width, xx, yy, first_stuff)
    for region, cls in enumerate(classes):
        inside = regions == region
        c0, c1 = _colour_pair(rng)
        weight = _TEXTURES[cls](xx, yy, rng)[inside][:, None]
        image[inside] = c0 + (c1 - c0) * weight
        label[inside] = cls + 1

    short = min(height, width)
    kinds = rng.integers(len(DEMO_THINGS), size=int(rng.integers(2, 5)))
    if index is not None:
        kinds[-1] = index % len(DEMO_THINGS)
    for kind in (int(k) for k in kinds):
        size = rng.uniform(0.15, 0.35) * short
        cx, cy = rng.uniform(0.1 * width, 0.9 * width), rng.uniform(0.1 * height, 0.9 * height)
        sdf = _shape_sdf(DEMO_THINGS[kind], xx, yy, cx, cy, size, rng)
        fill, line = _colour_pair(rng)
        shading = 18.0 * _smooth_field(rng, height, width, cells=2)[..., None]
        if rng.uniform() < 0.5:  # a thin unlabelled border just outside the shape
            border = (sdf >= 0.0) & (sdf < rng.uniform(1.5, 3.5))
            image[border] = rng.uniform(0.0, _PIXEL_MAX, size=3)
            label[border] = 0
        inside = sdf < 0.0
        # Nested copies of the outline (iso-lines of the distance, 8-14 px apart): the shape is visible
        # locally, as arcs, corners or zigzags, not only along the border.
        period = rng.uniform(8.0, 14.0)
        contour = (np.mod(-sdf / period, 1.0) < rng.uniform(0.25, 0.45))[..., None]
        body = np.where(contour, line, fill + shading)
        image[inside] = body[inside]
        label[inside] = len(DEMO_STUFF) + kind + 1

    light = 1.0 + 0.15 * _smooth_field(rng, height, width, cells=3)[..., None]
    image = image * light + rng.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape)
    return np.clip(np.rint(image), 0, _PIXEL_MAX).astype(np.uint8), label
