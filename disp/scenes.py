"""SHAPES scenes and their drawing: objects with a category, a colour and a grid cell, rendered as
pictograms (a silhouette per category) or tiles (a cell-filling texture per category). `disp.shapes`
builds the data set (questions, answers, splits) on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
    "purple": (150, 50, 200),
    "orange": (250, 130, 20),
}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "middle", "right")
POSITIONS = tuple("center" if (r, c) == ("middle", "middle") else f"{r} {c}" for r in ROWS for c in COLS)
POSITIONS_2X2 = ("top left", "top right", "bottom left", "bottom right")
GRIDS = {3: POSITIONS, 2: POSITIONS_2X2}
STYLES = ("pictogram", "tile")


# Pictograms in unit coordinates of an object's box: (kind, points) with kind "poly", "ellipse" or "hole"
# (an ellipse in background colour), and a point inside the filled area for checks.
_SHAPES: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {
    "dog": [
        ("poly", [(0.08, 0.4), (0.76, 0.4), (0.76, 0.72), (0.08, 0.72)]),  # body
        ("poly", [(0.08, 0.6), (0.3, 0.6), (0.3, 1.0), (0.08, 1.0)]),  # back leg
        ("poly", [(0.54, 0.6), (0.76, 0.6), (0.76, 1.0), (0.54, 1.0)]),  # front leg
        ("poly", [(0.58, 0.1), (1.0, 0.1), (1.0, 0.44), (0.58, 0.5)]),  # head
        ("poly", [(0.58, 0.14), (0.68, 0.0), (0.76, 0.14)]),  # ear
        ("poly", [(0.0, 0.14), (0.1, 0.14), (0.2, 0.46), (0.08, 0.48)]),  # tail
    ],
    "boat": [
        ("poly", [(0.0, 0.6), (1.0, 0.6), (0.8, 0.98), (0.2, 0.98)]),  # hull
        ("poly", [(0.42, 0.0), (0.54, 0.0), (0.54, 0.6), (0.42, 0.6)]),  # mast
        ("poly", [(0.54, 0.04), (0.96, 0.52), (0.54, 0.52)]),  # sail
    ],
    "ball": [("ellipse", [(0.02, 0.02), (0.98, 0.98)])],
    "box": [("poly", [(0.08, 0.08), (0.92, 0.08), (0.92, 0.92), (0.08, 0.92)])],
    "tent": [("poly", [(0.5, 0.04), (0.97, 0.94), (0.03, 0.94)])],
    "ring": [("ellipse", [(0.03, 0.03), (0.97, 0.97)]), ("hole", [(0.26, 0.26), (0.74, 0.74)])],
    "cross": [
        ("poly", [(0.36, 0.03), (0.64, 0.03), (0.64, 0.97), (0.36, 0.97)]),
        ("poly", [(0.03, 0.36), (0.97, 0.36), (0.97, 0.64), (0.03, 0.64)]),
    ],
}
ANCHORS = {
    "dog": (0.4, 0.56), "boat": (0.5, 0.78), "ball": (0.5, 0.5), "box": (0.5, 0.5),
    "tent": (0.5, 0.7), "ring": (0.5, 0.12), "cross": (0.5, 0.5),
}
CATEGORIES = tuple(_SHAPES)

# Tile textures: which pixels (x, y in image coordinates) of a tile carry the full colour; the others a
# pale tint of it. The period is 8 px, one 8 px visual token: every token of a tile shows one whole period,
# and the patterns differ at low spatial frequency (halves, quadrants, triangles), not only in fine detail.
_TEXTURES = {
    "dog": lambda x, y: y % 8 < 4,  # top halves
    "boat": lambda x, y: x % 8 < 4,  # left halves
    "ball": lambda x, y: (x % 8 < 4) & (y % 8 < 4),  # top-left quadrants
    "box": lambda x, y: x >= 0,  # solid
    "tent": lambda x, y: x % 8 >= y % 8,  # upper-right triangles
    "ring": lambda x, y: x % 8 + y % 8 < 8,  # upper-left triangles
    "cross": lambda x, y: ((x % 8) // 2 == 1) | ((y % 8) // 2 == 1),  # a plus in every period
}
TINT = 0.65  # share of white in a tile's pale pixels
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    category: str
    colour: str
    position: str
    dx: int = 0
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    """Objects in reading order (row by row, left to right); `jitter` is the largest shift it allows,
    `grid` and `style` how it is laid out and drawn (see the module docstring)."""

    objects: tuple[ShapeObject, ...]
    jitter: int = 0
    grid: int = 3
    style: str = "pictogram"

    @property
    def signature(self) -> str:
        return "|".join(sorted(f"{o.category}:{o.colour}:{o.position}" for o in self.objects))

    def find(self, **attrs: str) -> ShapeObject | None:
        hits = [o for o in self.objects if all(getattr(o, k) == v for k, v in attrs.items())]
        return hits[0] if hits else None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Scene:
        """The scene of a record's `meta`."""
        return cls(tuple(ShapeObject(**o) for o in meta["objects"]), meta.get("jitter", 0), meta.get("grid", 3),
                   meta.get("style", "pictogram"))


def object_box(obj: ShapeObject, size: int, jitter: int = 0, grid: int = 3) -> tuple[int, int, int]:
    """(x0, y0, side) of the square an object is drawn in, in pixels of a `size` image.

    A margin of `jitter` + 1 pixels keeps every object inside its cell with a free border, however shifted.
    """
    cell = size // grid
    margin = jitter + 1
    row, col = divmod(GRIDS[grid].index(obj.position), grid)
    return col * cell + margin + obj.dx, row * cell + margin + obj.dy, cell - 2 * margin


def _render_tiles(scene: Scene, size: int) -> Image.Image:
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.float64)
    ys, xs = np.mgrid[0:size, 0:size]
    white = np.array(BACKGROUND, dtype=np.float64)
    for obj in scene.objects:
        x0, y0, side = object_box(obj, size, scene.jitter, scene.grid)
        colour = np.array(COLOURS[obj.colour], dtype=np.float64)
        box = (slice(y0, y0 + side), slice(x0, x0 + side))
        on = _TEXTURES[obj.category](xs[box], ys[box])
        pixels[box] = np.where(on[..., None], colour, TINT * white + (1 - TINT) * colour)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Draw a scene as an RGB image (deterministic). Pictograms are supersampled, then box-filtered down;
    tiles are drawn pixel-exact."""
    if scene.style == "tile":
        return _render_tiles(scene, size)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, side = (v * _SUPERSAMPLE for v in object_box(obj, size, scene.jitter, scene.grid))
        for kind, points in _SHAPES[obj.category]:  # side - 1: the far edge pixel is drawn too
            xy = [(x0 + px * (side - 1), y0 + py * (side - 1)) for px, py in points]
            if kind == "poly":
                draw.polygon(xy, fill=COLOURS[obj.colour])
            else:
                draw.ellipse(xy, fill=COLOURS[obj.colour] if kind == "ellipse" else BACKGROUND)
    return image.resize((size, size), Image.Resampling.BOX)
