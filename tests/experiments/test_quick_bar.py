"""The issue's --quick bar on the committed SHAPES base (minutes on 2 CPU cores).

At the quick defaults (captions-only training as in the paper, 8 px corner patch, seed 1) both DiSP as
published and disp's `disp_occlusion` variant meet it (docs/reproduction.md, "Captions-only training").
The implant itself takes at only some seeds on this base; the runner's quick seed is one where it does.
"""

from __future__ import annotations

import pytest

from experiments.reproduce import ReproduceConfig, check_quick, reproduce


@pytest.mark.slow
def test_quick_run_meets_the_bar_with_disp_and_its_occlusion_variant(tmp_path):
    cfg = ReproduceConfig.quick(device="cpu")
    rows = reproduce(cfg, tmp_path, log=print)["rows"]
    by = {r["defense"]: r for r in rows}
    print({d: (r["cp"], r["asr_wo"], r["asr_wt"], r.get("purified_backdoor_rate")) for d, r in by.items()})
    assert check_quick(rows, "disp") == []
    assert check_quick(rows, "disp_occlusion") == []
    # the occlusion variant's rewrites are clean themselves (0 of 60 kept it at seed 1); the paper's score
    # leaves the trigger visible in about a third of them and the recovery removes the rest
    assert by["disp_occlusion"]["purified_backdoor_rate"] <= 0.1
    assert by["disp"]["purified_backdoor_rate"] < 0.5
