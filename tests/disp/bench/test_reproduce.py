"""The reproduction runner end to end on a tiny checkpoint (plumbing only: a random model has no backdoor)."""

from __future__ import annotations

from disp.bench.reproduce import ReproduceConfig, check_quick, reproduce
from disp.config import FinetuneConfig, SamplerConfig


def test_runner_writes_a_row_per_cell_and_defense(tiny_dir, tmp_path):
    cfg = ReproduceConfig(base=str(tiny_dir), targets=("misclassification",), triggers=("corner",),
                          trigger_targets=(), defenses=("none", "disp", "oracle_filter"), n_train=20, n_asr=4,
                          n_cp=4, implant=FinetuneConfig(epochs=1, batch_size=8), recovery_epochs=1,
                          sampler=SamplerConfig(8, 8, 8), poison_sweep=(0.5,), poison_sweep_defenses=("none",),
                          mask_sweep=(0.5,))
    result = reproduce(cfg, tmp_path, log=lambda _: None)
    rows = result["rows"]
    assert [r["defense"] for r in rows] == ["none", "disp", "oracle_filter"]
    for r in rows + result["poison_ratio_sweep"] + result["mask_ratio_sweep"]:
        assert {"target", "trigger", "defense", "poison_ratio", "cp", "asr_wo", "asr_wt"} <= r.keys()
        assert all(0.0 <= r[k] <= 1.0 for k in ("cp", "asr_wo", "asr_wt"))
    assert result["poison_ratio_sweep"][0]["poison_ratio"] == 0.5
    assert result["mask_ratio_sweep"][0]["mask_ratio"] == 0.5
    assert rows[1]["purified_backdoor_rate"] is not None
    # a random model has no backdoor: the quick bar must say so rather than pass
    assert any("did not take" in f for f in check_quick(rows))
