"""experiments/fast_parity.py on a tiny checkpoint: one row per sampler setting, measured against exact decoding,
for the paper's DiSP and for a variant with the anchored recovery (plumbing: a random model has no backdoor)."""

from __future__ import annotations

import json

import pytest

from disp.config import FinetuneConfig, SamplerConfig
from experiments import fast_parity
from experiments.reproduce import ReproduceConfig


def _cfg(tiny_dir) -> ReproduceConfig:
    return ReproduceConfig.quick(base=str(tiny_dir), n_train=16, n_asr=4, n_cp=4, recovery_epochs=1,
                                 implant=FinetuneConfig(epochs=1, batch_size=8), sampler=SamplerConfig(8, 8, 8))


@pytest.mark.parametrize("defense", ["disp", "disp_isolation_anchor"])
def test_rows_compare_each_setting_with_exact(tiny_dir, tmp_path, defense):
    out = tmp_path / "parity.json"
    result = fast_parity.run(tiny_dir, tmp_path / "work", ["cache4", "threshold0.99+cache8+bf16"], defense=defense,
                             out=out, cfg=_cfg(tiny_dir), log=lambda _: None)
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["exact", "cache4", "threshold0.99+cache8+bf16"]
    assert json.loads(out.read_text())["rows"] == rows and result["defense_name"] == defense
    exact = rows[0]
    assert exact["agreement"] == 1.0 and exact["flops_ratio"] == 1.0 and exact["parity"]
    for r in rows[1:]:
        assert {**r["sampler"], **({"finetune": r["finetune"]} if r["finetune"] else {})} == fast_parity.SETTINGS[r["setting"]]
        agree = sum(a == b for a, b in zip(r["answers"], exact["answers"], strict=True)) / len(r["answers"])
        assert r["agreement"] == pytest.approx(agree)
        assert r["flops_ratio"] == pytest.approx(exact["purification_flops"] / r["purification_flops"])
        assert r["flops_ratio"] > 1  # the cached steps run the answer alone
        assert r["parity"] == (abs(r["asr_wt"] - exact["asr_wt"]) <= 0.01 + 1e-9
                               and abs(r["cp"] - exact["cp"]) <= 0.01 + 1e-9)
    anchor = result["defense"]["finetune"]["anchor_weight"]
    assert (anchor > 0) == (defense == "disp_isolation_anchor")
    assert result["defense"]["saliency"]["method"] == ("isolation" if anchor else "fisher")
    assert (tmp_path / "work" / "fast" / defense / "cache4" / "projector.safetensors").is_file()


def test_exact_row_of_another_defense_is_refused(tiny_dir, tmp_path, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"base": str(tiny_dir), "defense_name": "disp", "rows": [{}]}))
    with pytest.raises(SystemExit):
        fast_parity.main(["--base", str(tiny_dir), "--work", str(tmp_path), "--defense", "disp_isolation_anchor",
                          "--exact-from", str(earlier)])
    assert "is of defense disp, not disp_isolation_anchor" in capsys.readouterr().err
