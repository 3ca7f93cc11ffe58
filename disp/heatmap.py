"""Saliency heatmaps: a sample's image with its visual tokens' scores overlaid and the held tokens outlined.

A single-view image gives the model g x g visual tokens in row-major order, token i covering grid cell
(i // g, i % g) of the image resized to a square (the "square" layout's view; a "pad" layout's padding is not
drawn). An anyres image, whose tokens span several views and row-end tokens, is not drawn (ValueError).

    heatmap        PIL image + scores [N] + held token indices -> RGB PIL image
    write_heatmaps one PNG per sample of a defense's report, under OUT/heatmaps/
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from disp.formats import open_dataset

HEATMAP_SIZE = 384  # side of the drawn square, pixels
HELD_COLOUR = (0, 200, 255)  # outline of a held (masked) token
HEATMAPS_DIR = "heatmaps"


def token_grid(n: int) -> int:
    """The side g of a g x g grid of n visual tokens; ValueError when n is not a square (anyres layouts)."""
    g = math.isqrt(n)
    if n <= 0 or g * g != n:
        raise ValueError(
            f"{n} visual tokens do not form a square grid (an anyres image); no heatmap is drawn"
        )
    return g


def _ramp(t: float) -> tuple[int, int, int, int]:
    """Position t in [0, 1] of a score in its sample's range -> RGBA: clear at 0, through yellow to red at 1."""
    return 255, int(255 * (1 - t) ** 0.5), 0, int(200 * t)


def heatmap(
    image: Image.Image | None, scores: Sequence[float], held: Sequence[int] = (), size: int = HEATMAP_SIZE
) -> Image.Image:
    """The image (grey when None) resized to size x size, each visual token's cell tinted by where its score lies
    between the sample's lowest and highest (the lowest untinted; equal scores tint nothing: the absolute scale
    is the report's `saliency.max`) and each held token's cell outlined: RGB [size, size]."""
    g = token_grid(len(scores))
    base = image.convert("RGB") if image is not None else Image.new("RGB", (size, size), (128, 128, 128))
    base = base.resize((size, size), Image.Resampling.BICUBIC).convert("RGBA")
    lo, hi = min(scores), max(scores)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def cell(i: int) -> tuple[int, int, int, int]:
        r, c = divmod(i, g)
        return c * size // g, r * size // g, (c + 1) * size // g - 1, (r + 1) * size // g - 1

    for i, s in enumerate(scores):
        t = (s - lo) / (hi - lo) if hi > lo else 0.0
        if t > 0:
            draw.rectangle(cell(i), fill=_ramp(t))
    width = max(1, size // (g * 8))
    for i in held:
        if 0 <= i < len(scores):
            draw.rectangle(cell(i), outline=(*HELD_COLOUR, 255), width=width)
    return Image.alpha_composite(base, layer).convert("RGB")


def heatmap_name(index: int, sample_id: str) -> str:
    """The PNG's file name: the record's position and its id with anything but [A-Za-z0-9_.-] replaced."""
    return f"{index:06d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', sample_id)[:80]}.png"


def write_heatmaps(out_dir: str | Path, data_json: str | Path, images: str | Path | None = None) -> dict:
    """One PNG per sample of OUT/report.json's `samples` (with scores in OUT/saliency.json) under
    OUT/heatmaps/; returns {"written": [file names], "skipped": {id: reason}}. A defense without a scoring
    stage has no saliency.json: FileNotFoundError naming it."""
    out_dir = Path(out_dir)
    scored = out_dir / "saliency.json"
    if not scored.is_file():
        raise FileNotFoundError(
            f"{scored}: no saliency to draw (only the 'disp' defense scores visual tokens)"
        )
    saliency = json.loads(scored.read_text())["saliency"]
    rows = json.loads((out_dir / "report.json").read_text())["samples"]
    ds = open_dataset(data_json, images)
    (out_dir / HEATMAPS_DIR).mkdir(exist_ok=True)
    written, skipped = [], {}
    for row in rows:
        sid = row["id"]
        if sid not in saliency:
            skipped[sid] = "no saliency"
            continue
        try:
            img = heatmap(ds.source.open(row["image"]), saliency[sid], row.get("held_tokens", []))
        except ValueError as exc:
            skipped[sid] = str(exc)
            continue
        name = heatmap_name(row["index"], sid)
        img.save(out_dir / HEATMAPS_DIR / name)
        written.append(name)
    return {"written": written, "skipped": skipped}


__all__ = ["HEATMAPS_DIR", "heatmap", "heatmap_name", "token_grid", "write_heatmaps"]
