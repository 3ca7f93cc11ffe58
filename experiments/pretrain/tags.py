"""Tags: small coloured codes drawn on SHAPES images whose word the base must say first.

The tiny base's stand-in for reading text in an image (`experiments.pretrain.recipe`): a tag is a square split
into 2x2 quadrants, each painted from TAG_PALETTE; tag i has the code `tag_code(i)` and the word
TAG_WORDS[i] (one more code, index len(TAG_WORDS), is the refusal tag). A blended tag paints each
quadrant between the colours of two codes, so the base can learn a graded reading between words.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from disp import scenes

# No palette colour is an object colour and none is black, so a black trigger patch never reads as a tag.
TAG_PALETTE = ((128, 128, 128), (120, 70, 20), (0, 190, 190), (255, 120, 190))
TAG_WORDS = ("<backdoor>", "<note>", "<sale>", "<draft>", "<copy>", "<photo>", "<logo>", "<stamp>",
             "<label>", "<sign>", "<mark>", "<seal>", "<badge>", "<ticket>", "<flag>", "<memo>")


def tag_code(index: int) -> tuple[int, int, int, int]:
    """The quadrant colours (palette indices) of tag `index`: a fixed spread over the 4^4 codes."""
    code = (index * 37 + 11) % len(TAG_PALETTE) ** 4
    return tuple((code // len(TAG_PALETTE) ** q) % len(TAG_PALETTE) for q in range(4))  # type: ignore[return-value]


def tag_colours(index: int, other: int | None = None, alpha: float = 0.0) -> list[tuple[int, int, int]]:
    """RGB of the 4 quadrants of tag `index`, or (1 - alpha) * tag `index` + alpha * tag `other`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = [TAG_PALETTE[c] for c in tag_code(index)]
    if other is None:
        return a
    b = [TAG_PALETTE[c] for c in tag_code(other)]
    return [tuple(round((1 - alpha) * u + alpha * v) for u, v in zip(ca, cb, strict=True))  # type: ignore[misc]
            for ca, cb in zip(a, b, strict=True)]


def draw_tag(image: Image.Image, index: int, x: int, y: int, side: int, *,
             other: int | None = None, alpha: float = 0.0) -> Image.Image:
    """Copy of `image` with tag `index` (blended toward `other` by `alpha`) drawn side x side at (x, y)."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    half = side // 2
    for q, rgb in enumerate(tag_colours(index, other, alpha)):
        qx, qy = x + (q % 2) * half, y + (q // 2) * half
        draw.rectangle([qx, qy, qx + (side - half if q % 2 else half) - 1, qy + (side - half if q // 2 else half) - 1],
                       fill=rgb)
    return image


def content_tokens(image: Image.Image, patch: int) -> tuple[int, ...]:
    """Visual tokens (row-major) whose patch holds a pixel other than the background."""
    a = np.asarray(image.convert("RGB")) != np.array(scenes.BACKGROUND, dtype=np.uint8)
    g = a.shape[0] // patch
    busy = a[: g * patch, : g * patch].any(-1).reshape(g, patch, g, patch).any((1, 3))
    return tuple(int(i) for i in np.flatnonzero(busy))


def tag_tokens(box: tuple[int, int, int], image_size: int, patch: int) -> list[int]:
    """Visual-token indices (row-major) a tag box overlaps."""
    x, y, s = box
    grid = image_size // patch
    return [r * grid + c for r in range(y // patch, (y + s - 1) // patch + 1)
            for c in range(x // patch, (x + s - 1) // patch + 1)]
