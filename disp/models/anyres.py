"""How a checkpoint turns one image into visual tokens: one square view, or LLaVA-NeXT's "anyres" crops.

The config.json fields decide (`image_aspect_ratio`, `image_grid_pinpoints`, `mm_patch_merge_type`), as in
LLaVA-NeXT's `mm_utils.py` and `llava_arch.py`, which LLaDA-V (train/llava, @2252769) and LaViDa (llava/,
@284ef5c) both carry unchanged in these parts:

- "square": the image resized to S×S; "pad": first padded to a square with the processor's mean colour.
- "anyres" / "anyres_max_N": view 0 is the whole image resized to S×S (not padded). The pinpoint (w, h) that
  keeps the most of the image's pixels when the image is scaled into it (effective resolution
  min(scaled area, original area); ties go to the least wasted area, then to the first listed) is the
  canvas: the image is resized into it keeping its aspect ratio (the short side rounded up), pasted centred
  on black, and cut into S×S crops row by row.
- Merge ("spatial_unpad"): the crops' g×g token grids are tiled into one (rows·g)×(cols·g) grid, the rows or
  columns that only cover the black padding are cut off ("unpad"), with anyres_max_N the grid is resized
  bilinearly to ⌊h/t⌋×⌊w/t⌋ when t = √(h·w / (N·g²)) > 1.1, and one `image_newline` embedding ends every
  row. View 0's g² tokens come first. "spatial" tiles without unpad or newline; "flat" concatenates the
  views. A single view under an "unpad" merge gets one `image_newline` at its end.

So with LLaDA-V's SigLIP (S = 384, g = 27) and anyres_max_4: a 1×1 grid gives 729 + 27·28 = 1485 visual
tokens, a 2×2 grid 729 + 54·55 = 3699. LaViDa pools each view to g = 14 before the merge.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from disp.models.checkpoint import CheckpointError

ASPECTS = ("square", "pad", "anyres")
MERGES = ("flat", "spatial", "spatial_unpad")
DOWNSCALE_ABOVE = 1.1  # anyres_max_N resizes the crop grid only when t exceeds this (llava_arch.py)

Size = tuple[int, int]  # (width, height), as PIL's Image.size


def parse_pinpoints(value: Any, image_size: int) -> tuple[Size, ...]:
    """`image_grid_pinpoints` → canvas sizes (width, height) in pixels.

    Accepts a list of [w, h] pairs, its string form "[(384, 768), ...]", or a range of grids in units of the
    tower's image size, "(1x1),...,(6x6)" → every (i·S, j·S) for i from 1 to 6 and j from 1 to 6.
    """
    if isinstance(value, str):
        if "x" in value:
            ends = re.findall(r"\((\d+)x(\d+)\)", value)
            if not ends:
                raise CheckpointError(f"config.json: cannot read image_grid_pinpoints {value!r}")
            (a0, b0), (a1, b1) = (tuple(map(int, e)) for e in (ends[0], ends[-1]))
            return tuple((i * image_size, j * image_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise CheckpointError(f"config.json: cannot read image_grid_pinpoints {value!r}") from exc
    try:
        pins = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: image_grid_pinpoints must be [width, height] pairs, got {value!r}") \
            from exc
    bad = [p for p in pins if p[0] <= 0 or p[1] <= 0 or p[0] % image_size or p[1] % image_size]
    if not pins or bad:
        raise CheckpointError(f"config.json: image_grid_pinpoints must be positive multiples of the tower's "
                              f"image size {image_size}, got {bad or 'none'}")
    return pins


def best_resolution(size: Size, pinpoints: Sequence[Size]) -> Size:
    """LLaVA-NeXT's `select_best_resolution`: the pinpoint keeping the most pixels, then wasting the fewest."""
    W, H = size
    best, best_effective, best_wasted = pinpoints[0], -1, math.inf
    for w, h in pinpoints:
        scale = min(w / W, h / H)
        effective = min(int(W * scale) * int(H * scale), W * H)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def unpadded_shape(rows: int, cols: int, size: Size) -> tuple[int, int]:
    """Token grid rows × cols of a padded canvas → the rows × cols that cover the image (`unpad_image`)."""
    W, H = size
    if W / H > cols / rows:  # the image is wider than the canvas: padding above and below
        pad = (rows - int(H * (cols / W))) // 2
        return rows - 2 * pad, cols
    pad = (cols - int(W * (rows / H))) // 2
    return rows, cols - 2 * pad


@dataclass(frozen=True)
class ImageLayout:
    """The image fields of a config.json.

    image_size: S, the tower's input side in pixels; grid: g, tokens per side of one view as the language
    model receives them (after any pooling); aspect: "square", "pad" or "anyres"; max_crops: N of
    anyres_max_N (None: no downscale); pinpoints: anyres canvases (width, height); merge: mm_patch_merge_type.
    """

    image_size: int
    grid: int
    aspect: str = "square"
    max_crops: int | None = None
    pinpoints: tuple[Size, ...] = ()
    merge: str = "flat"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], image_size: int, grid: int) -> ImageLayout:
        """Read `image_aspect_ratio`, `image_grid_pinpoints` and `mm_patch_merge_type`; bad values are named."""
        ratio = str(cfg.get("image_aspect_ratio") or "square")
        merge = str(cfg.get("mm_patch_merge_type") or "flat")
        if merge not in MERGES:
            raise CheckpointError(f"config.json: mm_patch_merge_type must be one of {MERGES}, got {merge!r}")
        if ratio in ("square", "pad"):
            return cls(image_size, grid, ratio, merge=merge)
        capped = re.fullmatch(r"anyres_max_(\d+)", ratio)
        if ratio != "anyres" and not capped:
            raise CheckpointError(f"config.json: image_aspect_ratio must be 'square', 'pad', 'anyres' or "
                                  f"'anyres_max_<N>', got {ratio!r}")
        max_crops = int(capped.group(1)) if capped else None
        if max_crops == 0:
            raise CheckpointError(f"config.json: image_aspect_ratio {ratio!r}: N must be at least 1")
        pins = parse_pinpoints(cfg.get("image_grid_pinpoints"), image_size)
        return cls(image_size, grid, "anyres", max_crops, pins, merge)

    @property
    def newline(self) -> bool:
        """Whether the checkpoint has `model.image_newline` (LLaVA creates it for "unpad" merges)."""
        return "unpad" in self.merge

    @property
    def multi_view(self) -> bool:
        return self.aspect == "anyres"

    def crop_grid(self, size: Size) -> tuple[int, int]:
        """(columns, rows) of crops for an image of `size` (`get_anyres_image_grid_shape`)."""
        w, h = best_resolution(size, self.pinpoints)
        return w // self.image_size, h // self.image_size

    def merged_grid(self, size: Size) -> tuple[int, int]:
        """Rows × columns of the crops' token grid after unpad and the anyres_max downscale."""
        cols, rows = self.crop_grid(size)
        h, w = unpadded_shape(rows * self.grid, cols * self.grid, size)
        t = self._downscale(h, w)
        return (int(h // t), int(w // t)) if t > DOWNSCALE_ABOVE else (h, w)

    def _downscale(self, h: int, w: int) -> float:
        return math.sqrt(h * w / (self.max_crops * self.grid**2)) if self.max_crops else 0.0

    def num_views(self, size: Size) -> int:
        cols, rows = self.crop_grid(size) if self.multi_view else (0, 0)
        return 1 + cols * rows

    def token_count(self, size: Size) -> int:
        """Visual tokens of an image of `size` (width, height), without running anything."""
        g2 = self.grid**2
        if not self.multi_view:
            return g2 + int(self.newline)
        if self.merge != "spatial_unpad":  # "flat" and "spatial" keep every crop token, no newline
            return self.num_views(size) * g2
        h, w = self.merged_grid(size)
        return g2 + h * (w + 1)

    # -- pixels --------------------------------------------------------------------------------------
    def views(self, image: Image.Image, fill: tuple[int, int, int]) -> list[Image.Image]:
        """The S×S views of an RGB image: the whole image, then (anyres) the crops row by row.

        `fill` is the "pad" background (the processor's mean colour); anyres canvases are black.
        """
        S = self.image_size
        if self.aspect == "pad" and image.width != image.height:
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        whole = image if image.size == (S, S) else image.resize((S, S), Image.BICUBIC)
        if not self.multi_view:
            return [whole]
        tw, th = best_resolution(image.size, self.pinpoints)
        sw, sh = tw / image.width, th / image.height
        if sw < sh:
            nw, nh = tw, min(math.ceil(image.height * sw), th)
        else:
            nw, nh = min(math.ceil(image.width * sh), tw), th
        canvas = Image.new("RGB", (tw, th), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
        return [whole] + [canvas.crop((x, y, x + S, y + S)) for y in range(0, th, S) for x in range(0, tw, S)]

    # -- tokens --------------------------------------------------------------------------------------
    def merge_views(self, tokens: torch.Tensor, size: Size, newline: torch.Tensor | None) -> torch.Tensor:
        """Per-view tokens [n_views, g², D] of one image → its visual tokens [token_count(size), D].

        `newline` [D] is `model.image_newline` (needed when `self.newline`).
        """
        n, g2, D = tokens.shape
        g = self.grid
        if g2 != g * g or n != self.num_views(size):
            raise ValueError(f"expected {self.num_views(size)} views of {g * g} tokens for an image of size "
                             f"{size}, got {tuple(tokens.shape[:2])}")
        if self.newline and newline is None:
            raise ValueError(f"mm_patch_merge_type {self.merge!r} needs model.image_newline")
        nl = None if newline is None else newline.to(tokens.dtype)
        if not self.multi_view:
            return torch.cat([tokens[0], nl[None]]) if self.newline else tokens[0]
        if self.merge == "flat":
            return tokens.flatten(0, 1)
        cols, rows = self.crop_grid(size)
        crops = tokens[1:].view(rows, cols, g, g, D)
        if self.merge == "spatial":
            return torch.cat([tokens[0], crops.permute(0, 2, 1, 3, 4).reshape(-1, D)])
        x = crops.permute(4, 0, 2, 1, 3).reshape(D, rows * g, cols * g)  # (D, rows·g, cols·g)
        h, w = unpadded_shape(rows * g, cols * g, size)
        top, left = (rows * g - h) // 2, (cols * g - w) // 2
        x = x[:, top : top + h, left : left + w]
        t = self._downscale(h, w)
        if t > DOWNSCALE_ABOVE:
            x = F.interpolate(x[None], [int(h // t), int(w // t)], mode="bilinear")[0]
        x = torch.cat([x, nl[:, None, None].expand(D, x.shape[1], 1)], dim=-1)  # (D, h, w + 1)
        return torch.cat([tokens[0], x.flatten(1, 2).transpose(0, 1)])
