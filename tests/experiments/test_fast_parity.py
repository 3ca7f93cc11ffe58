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


def test_table_joins_runs_per_cell_with_changes_against_exact(tmp_path, capsys):
    def row(setting, cp, asr, flops, agree=1.0):
        return {"setting": setting, "agreement": agree, "purified_backdoor_rate": 0.0, "cp": cp, "asr_wt": asr,
                "purification_flops": flops, "finetune_s": 10.0}

    first = {"base": "x/shapes-base-v3", "defense_name": "disp",
             "rows": [row("exact", 0.71, 1.0, 100.0), row("threshold0.99", 0.75, 1.0, 10.0, 0.9)]}
    second = {"base": "x/shapes-base-v3", "defense_name": "disp",
              "rows": [first["rows"][0], row("cache8", 0.70, 1.0, 40.0)]}
    paths = []
    for i, result in enumerate((first, second)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(result))
    assert fast_parity.main(["--table", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 3  # header, rule, exact + the two settings of the one cell
    assert "| threshold0.99 | 90.0 % | 0.0 % | 75 % (+4) | 100.0 % (+0.0) | 10.0x | 10.0 | **no** |" in lines[3]
    assert lines[4].endswith("| 70 % (-1) | 100.0 % (+0.0) | 2.5x | 10.0 | yes |")
