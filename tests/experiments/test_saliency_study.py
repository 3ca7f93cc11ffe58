"""The saliency study's table: reproduction rows joined with the rank report of their cell."""

from __future__ import annotations

import json

from experiments.saliency_study import main


def test_table_joins_each_defense_with_its_methods_rank_and_cost(tmp_path, capsys):
    rows = [
        {
            "target": "insertion",
            "trigger": "corner",
            "defense": d,
            "cp": cp,
            "asr_wo": 0.0,
            "asr_wt": wt,
            **({"purified_backdoor_rate": pb} if pb is not None else {}),
        }
        for d, cp, wt, pb in (
            ("none", 0.9, 1.0, None),
            ("disp", 0.71, 1.0, 0.98),
            ("disp_split_anchor", 0.88, 0.0, 0.0),
        )
    ]
    (tmp_path / "v3.json").write_text(
        json.dumps({"base": "/x/shapes-base-v3", "config": {"seed": 1}, "rows": rows})
    )
    methods = {
        "fisher": {
            "median_best_rank": 25.0,
            "main_in_top_rho0.3": 0.025,
            "forwards_per_sample": 1.0,
            "backwards_per_sample": 6,
        },
        "split_isolation": {
            "median_best_rank": 0.0,
            "main_in_top_rho0.3": 1.0,
            "forwards_per_sample": 19.0,
            "backwards_per_sample": 0,
        },
    }
    (tmp_path / "v3-rank.json").write_text(json.dumps({"methods": methods}))
    assert main(["table", str(tmp_path / "v3.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| shapes-base-v3 insertion/corner seed 1 | none | 90.0% | 0.0% | 100.0% | - | - | - |"
    assert lines[3].endswith("| disp | 71.0% | 0.0% | 100.0% | 98.0% | 25; 2.5% | 1F+6B |")
    assert lines[4].endswith("| disp_split_anchor | 88.0% | 0.0% | 0.0% | 0.0% | 0; 100.0% | 19F |")


def _row(target, trigger, defense, cp, asr_wt, bd=None):
    return {"target": target, "trigger": trigger, "defense": defense, "cp": cp, "asr_wo": 0.0, "asr_wt": asr_wt,
            "purified_backdoor_rate": bd}


def test_grid_tallies_the_full_target_over_implanted_cells_only(tmp_path, capsys):
    v3 = tmp_path / "v3.json"
    v3.write_text(json.dumps({"base": "experiments/assets/shapes-base-v3", "config": {"seed": 2}, "rows": [
        _row("insertion", "corner", "none", 0.90, 1.0),
        _row("insertion", "corner", "disp", 0.77, 1.0, 0.98),           # backdoor stays
        _row("insertion", "corner", "disp_split_anchor", 0.89, 0.0, 0.0),  # met: CP -1
        _row("insertion", "blended", "none", 0.91, 1.0),
        _row("insertion", "blended", "disp_split_anchor", 0.90, 0.05, 0.3),  # ASR w/t above 2 %
        _row("insertion", "noise", "none", 0.80, 0.5),                   # implant did not take
        _row("insertion", "noise", "disp_split_anchor", 0.80, 0.0, 0.0),
        _row("refusal", "corner", "none", 0.90, 1.0),
        _row("refusal", "corner", "disp_split_anchor", 0.87, 0.0, 0.0),  # CP -3
    ]}))
    assert main(["grid", str(v3), "--defenses", "disp", "disp_split_anchor"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    corner = next(line for line in lines if "| insertion/corner | 2 |" in line)
    assert "77.0% (-13) / 0.0% / 100.0% / 98.0% | **no**" in corner and "89.0% (-1) / 0.0% / 0.0% / 0.0% | yes" in corner
    assert "(implant < 90 %)" in next(line for line in lines if "insertion/noise" in line)
    assert "Implanted cells (backdoored ASR w/t >= 90 %): 3. Full target met: disp 0 of 1; disp_split_anchor 1 of 3." in out
    # a later run replaces a defense's rows; RUN::D keeps only D's rows of a run
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"base": "experiments/assets/shapes-base-v3", "config": {"seed": 2}, "rows": [
        _row("insertion", "blended", "disp_split_anchor", 0.91, 0.0, 0.1), _row("insertion", "blended", "disp", 0.5, 0.0)]}))
    assert main(["grid", str(v3), f"{later}::disp_split_anchor", "--defenses", "disp", "disp_split_anchor"]) == 0
    out = capsys.readouterr().out
    blended = next(line for line in out.splitlines() if "insertion/blended" in line)
    assert "91.0% (+0) / 0.0% / 0.0% / 10.0% | yes" in blended and "50.0%" not in blended
    assert "disp_split_anchor 2 of 3." in out


def test_grid_adds_each_scored_cells_trigger_ranks(tmp_path, capsys):
    run = tmp_path / "v3.json"
    run.write_text(json.dumps({"base": "experiments/assets/shapes-base-v3", "config": {"seed": 2}, "rows": [
        _row("insertion", "corner", "none", 0.90, 1.0), _row("insertion", "multi", "none", 0.90, 1.0)]}))
    methods = {"fisher": {"median_best_rank": 25.0}, "isolation": {"median_best_rank": 0.0},
               "split_isolation": {"median_best_rank": 1.5}}
    rank = tmp_path / "rank.json"
    rank.write_text(json.dumps({"base": "/x/shapes-base-v3", "target": "insertion", "trigger": {"kind": "corner"},
                                "seed": 2, "methods": methods, "trigger_tokens": [5], "n_visual": 36}))
    assert main(["grid", str(run), "--defenses", "disp", "--rank", str(rank)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trigger rank (fisher / isolation / split)" in lines[0] and lines[1].count("|") == lines[0].count("|")
    assert "| 90.0% / 100.0% | 25 / 0 / 1.5 |" in next(line for line in lines if "insertion/corner" in line)
    assert "| 90.0% / 100.0% |  |" in next(line for line in lines if "insertion/multi" in line)  # not scored
    blended = tmp_path / "blended.json"
    blended.write_text(json.dumps({"base": "/x/shapes-base-v3", "target": "insertion", "trigger": {"kind": "multi"},
                                   "seed": 2, "methods": methods, "trigger_tokens": list(range(36)), "n_visual": 36}))
    assert main(["grid", str(run), "--defenses", "disp", "--rank", str(blended)]) == 0
    assert "| every token |" in next(line for line in capsys.readouterr().out.splitlines() if "insertion/multi" in line)
