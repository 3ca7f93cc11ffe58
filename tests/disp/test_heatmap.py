"""Saliency heatmaps (`disp.heatmap`): where the tint and the held outlines fall, and `disp defend --heatmaps`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from disp.cli import main
from disp.heatmap import HELD_COLOUR, heatmap, heatmap_name, token_grid

FAST = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def _cell_mean(img: Image.Image, g: int, i: int) -> np.ndarray:
    """Mean RGB of the inner half of token i's cell."""
    a = np.asarray(img).astype(float)
    s = a.shape[0] // g
    r, c = divmod(i, g)
    return a[r * s + s // 4 : r * s + 3 * s // 4, c * s + s // 4 : c * s + 3 * s // 4].mean((0, 1))


def test_the_top_token_is_tinted_red_and_held_tokens_are_outlined():
    grey = Image.new("RGB", (50, 30), (100, 100, 100))
    scores = [0.0] * 16
    scores[5], scores[10] = 8.0, 2.0
    img = heatmap(grey, scores, held=[5, 15], size=160)
    assert img.size == (160, 160) and img.mode == "RGB"
    top, low, none = (_cell_mean(img, 4, i) for i in (5, 10, 0))
    assert np.allclose(none, 100, atol=1)  # a zero score leaves the image as it is
    assert top[0] > low[0] > none[0] and top[1] < top[0] - 100  # the highest score: the reddest cell
    a = np.asarray(img)
    edge = a[40 * 3 + 20, 40 * 3 + 1]  # left edge of held token 15 (row 3, column 3)
    assert np.abs(edge.astype(int) - np.array(HELD_COLOUR)).max() < 10
    assert np.abs(a[20, 40 * 0 + 1].astype(int) - 100).max() < 2  # token 0 is not held: no outline
    flat = np.asarray(heatmap(grey, [0.3] * 16, size=160))  # equal scores: nothing stands out, nothing tinted
    assert np.abs(flat.astype(int) - 100).max() < 2


def test_anyres_counts_and_names():
    assert token_grid(729) == 27
    with pytest.raises(ValueError, match="730 visual tokens do not form a square grid"):
        heatmap(None, [1.0] * 730)
    assert heatmap_name(3, "a/b c?") == "000003-a_b_c_.png"


def test_defend_writes_a_heatmap_per_reported_sample(tiny_dir, poisoned, tmp_path, capsys):
    out = tmp_path / "o"
    assert (
        main(
            [
                "defend",
                "--checkpoint",
                str(tiny_dir),
                "--data",
                str(poisoned.data_path),
                "--images",
                str(poisoned.data_path.parent),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--probes",
                "2",
                "--heatmaps",
                "--json",
                *FAST,
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    written = report["heatmaps"]["written"]
    assert len(written) == report["samples_total"] == 12 and report["heatmaps"]["skipped"] == {}
    files = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert files == sorted(written)
    row = report["samples"][0]
    img = Image.open(out / "heatmaps" / heatmap_name(row["index"], row["id"]))
    assert img.size == (384, 384) and np.asarray(img).std() > 0
