"""The reproduction runner end to end on a tiny checkpoint (plumbing only: a random model has no backdoor)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from disp.cell import build_data
from disp.config import FinetuneConfig, SamplerConfig
from disp.shapes import TASKS
from experiments.reproduce import (
    ANCHOR_WEIGHT,
    ISOLATION_MIN_NATS,
    ReproduceConfig,
    check_quick,
    cp_changes,
    defense_config,
    reproduce,
)


def test_runner_writes_a_row_per_cell_and_defense(tiny_dir, tmp_path):
    cfg = ReproduceConfig(base=str(tiny_dir), targets=("misclassification",), triggers=("corner",),
                          trigger_targets=(), defenses=("none", "disp", "oracle_filter", "disp_occlusion"),
                          n_train=20, n_asr=4,
                          n_cp=4, implant=FinetuneConfig(epochs=1, batch_size=8), recovery_epochs=1,
                          sampler=SamplerConfig(8, 8, 8), poison_sweep=(0.5,), poison_sweep_defenses=("none",),
                          mask_sweep=(0.5,), mask_sweep_defenses=("disp",))
    result = reproduce(cfg, tmp_path, log=lambda _: None)
    rows = result["rows"]
    assert [r["defense"] for r in rows] == ["none", "disp", "oracle_filter", "disp_occlusion"]
    env = result["environment"]
    assert env["torch"] and env["numpy"] and env["pillow"] and env["cpu"] and env["torch_threads"] >= 1
    for r in rows + result["poison_ratio_sweep"] + result["mask_ratio_sweep"]:
        assert {"target", "trigger", "defense", "poison_ratio", "cp", "asr_wo", "asr_wt"} <= r.keys()
        assert all(0.0 <= r[k] <= 1.0 for k in ("cp", "asr_wo", "asr_wt"))
    assert result["poison_ratio_sweep"][0]["poison_ratio"] == 0.5
    assert result["mask_ratio_sweep"][0]["mask_ratio"] == 0.5
    assert rows[1]["purified_backdoor_rate"] is not None and rows[3]["purified_backdoor_rate"] is not None
    for r in rows:  # per-sample CP: its mean is CP, every CP task is broken out, defenses are paired with "none"
        assert len(r["cp_correct"]) == cfg.n_cp and r["cp_correct"].count("1") / cfg.n_cp == pytest.approx(r["cp"])
        assert r["cp_by_task"] and set(r["cp_by_task"]) <= set(TASKS)
        assert all(0.0 <= v <= 1.0 for v in r["cp_by_task"].values())
    for r in rows[1:]:
        lost, gained = r["cp_vs_backdoored"]["lost"], r["cp_vs_backdoored"]["gained"]
        assert (gained - lost) / cfg.n_cp == pytest.approx(r["cp"] - rows[0]["cp"])
    report = json.loads((tmp_path / "misclassification-corner-p0.2" / "disp_occlusion" / "report.json").read_text())
    assert report["config"]["defense"] == "disp" and report["config"]["saliency"]["method"] == "occlusion"
    # a random model has no backdoor: the quick bar must say so rather than pass
    assert any("did not take" in f for f in check_quick(rows))


def test_variants_are_disp_with_their_saliency_and_threshold():
    cfg = ReproduceConfig()
    paper, iso = defense_config("disp", cfg), defense_config("disp_isolation", cfg)
    assert (paper.saliency.method, paper.purify.min_score) == ("fisher", 0.0)
    assert iso.defense == "disp" and iso.saliency.method == "isolation" and iso.purify.min_score == ISOLATION_MIN_NATS
    assert iso.finetune == paper.finetune and iso.purify.mask_ratio == paper.purify.mask_ratio == cfg.mask_ratio


def test_anchor_variant_is_isolation_with_the_anchored_recovery():
    cfg = ReproduceConfig()
    iso, anchored = defense_config("disp_isolation", cfg), defense_config("disp_isolation_anchor", cfg)
    assert (anchored.saliency, anchored.purify) == (iso.saliency, iso.purify)
    assert iso.finetune.anchor_weight == 0.0 and anchored.finetune.anchor_weight == ANCHOR_WEIGHT
    assert replace(anchored.finetune, anchor_weight=0.0) == iso.finetune
    assert defense_config("disp_isolation_anchor", replace(cfg, anchor_weight=1.0)).finetune.anchor_weight == 1.0
    assert defense_config("disp_isolation", replace(cfg, anchor_weight=1.0)).finetune.anchor_weight == 0.0
    with pytest.raises(ValueError, match="anchor_weight must be >= 0, got -1"):
        ReproduceConfig(anchor_weight=-1)


def test_a_variant_differing_in_recovery_reuses_the_rewrites(tiny_dir, tmp_path):
    cfg = ReproduceConfig(base=str(tiny_dir), targets=("insertion",), triggers=("corner",), trigger_targets=(),
                          defenses=("none", "disp_isolation", "disp_isolation_anchor"), n_train=16, n_asr=4, n_cp=4,
                          implant=FinetuneConfig(epochs=1, batch_size=8), recovery_epochs=1,
                          sampler=SamplerConfig(8, 8, 8), poison_sweep=(), mask_sweep=())
    rows = reproduce(cfg, tmp_path, log=lambda _: None)["rows"]
    assert [r["defense"] for r in rows] == ["none", "disp_isolation", "disp_isolation_anchor"]
    iso, anchored = (tmp_path / "insertion-corner-p0.2" / d for d in ("disp_isolation", "disp_isolation_anchor"))
    for f in ("saliency.json", "purified.json"):
        assert (iso / f).read_bytes() == (anchored / f).read_bytes()
    stages_iso, stages_anchored = (json.loads((d / "stages.json").read_text()) for d in (iso, anchored))
    for stage in ("scoring", "purifying"):  # not re-run: the copied records stand
        assert stages_anchored[stage] == stages_iso[stage]
    assert stages_anchored["finetuning"]["fingerprint"] != stages_iso["finetuning"]["fingerprint"]
    report = json.loads((anchored / "report.json").read_text())
    assert report["config"]["finetune"]["anchor_weight"] == ANCHOR_WEIGHT


def test_cp_changes_pairs_samples():
    row, ref = {"cp_correct": "1100"}, {"cp_correct": "1010"}
    assert cp_changes(row, ref) == {"lost": 1, "gained": 1}
    with pytest.raises(ValueError):
        cp_changes({"cp_correct": "1"}, ref)


def test_data_built_with_other_settings_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    """The data of a target is shared by every cell of a work dir: a second run with another seed, size or
    poison sweep (which sizes the misclassification dog pool) must not reuse it."""
    from disp.shapes import config_of_checkpoint

    shapes = config_of_checkpoint(tiny_dir)
    cfg = ReproduceConfig(n_train=10, n_asr=2, n_cp=2, poison_sweep=(), seed=1)
    root = tmp_path / "data-misclassification"
    paths = build_data(root, "misclassification", tiny_dir, cfg, shapes)
    assert build_data(root, "misclassification", tiny_dir, replace(cfg, defenses=("none",)), shapes) == paths
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(ValueError, match=r"data built with other settings \(dog_pool: 3, now 7; seed: 1, now 2\)"):
        build_data(root, "misclassification", tiny_dir, replace(cfg, seed=2, poison_sweep=(0.5,)), shapes)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing rebuilt or overwritten
    assert json.loads((root / "settings.json").read_text())["seed"] == 1
    # the insertion data does not depend on the dog pool, so another poison sweep reuses it
    ins = tmp_path / "data-insertion"
    build_data(ins, "insertion", tiny_dir, cfg, shapes)
    build_data(ins, "insertion", tiny_dir, replace(cfg, poison_sweep=(0.5,)), shapes)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"defenses: unknown \['dsip'\]"):
        ReproduceConfig(defenses=("none", "dsip"))
    with pytest.raises(ValueError, match=r"triggers: unknown \['patch'\]"):
        ReproduceConfig(triggers=("patch",))


def test_quick_bar_names_the_defense_that_misses_it():
    rows = [{"defense": "none", "cp": 0.70, "asr_wt": 1.0}, {"defense": "disp", "cp": 0.60, "asr_wt": 0.5},
            {"defense": "disp_occlusion", "cp": 0.69, "asr_wt": 0.0}]
    assert check_quick(rows) == ["disp ASR w/t 0.500 > 0.10",
                                 "disp CP 0.600 is more than 3 points from the backdoored 0.700"]
    assert check_quick(rows, "disp_occlusion") == []
    # exactly 3 points either way is within the bar (0.75 - 0.72 exceeds 0.03 in floating point)
    edge = [{"defense": "none", "cp": 0.72, "asr_wt": 1.0}, {"defense": "disp", "cp": 0.75, "asr_wt": 0.0}]
    assert check_quick(edge) == []
    assert check_quick([edge[0], {**edge[1], "cp": 0.68}]) == ["disp CP 0.680 is more than 3 points from the backdoored 0.720"]


def test_flags_override_the_chosen_defaults():
    from experiments.reproduce import build_parser
    from experiments.reproduce import config_from_args as reproduce_config

    args = build_parser().parse_args(["--quick", "--targets", "refusal", "--poison-sweep",
                                      "--mask-sweep", "0.05", "0.1", "--implant-lr", "0.002", "--n-train", "50",
                                      "--device", "cpu"])
    cfg = reproduce_config(args)
    assert cfg.targets == ("refusal",) and cfg.poison_sweep == () and cfg.mask_sweep == (0.05, 0.1)
    assert cfg.implant.lr == 0.002 and cfg.implant.epochs == ReproduceConfig().implant.epochs
    assert cfg.n_train == 50 and cfg.defenses == ("none", "disp", "disp_occlusion") and cfg.device == "cpu"  # --quick's defenses kept
    full = reproduce_config(build_parser().parse_args([]))
    assert full == ReproduceConfig()
    paper = reproduce_config(build_parser().parse_args(["--recovery-epochs", "2",
                                                        "--recovery-lr", "0.005"]))
    assert (paper.recovery_epochs, paper.recovery_lr) == (2, 0.005)


def test_report_tables_and_figures(tmp_path):
    from experiments.report import (
        figure_mask,
        figure_poison,
        main_table,
        target_table,
        trigger_table,
    )

    def row(defense, trigger="corner", target="insertion", cp=0.8, wt=0.9, **kw):
        return {"target": target, "trigger": trigger, "defense": defense, "poison_ratio": 0.2, "cp": cp,
                "asr_wo": 0.0, "asr_wt": wt, **kw}

    rows = [row("none"), row("disp", cp=0.5, wt=0.01, mask_ratio=0.3), row("none", trigger="noise", wt=0.7)]
    table = main_table(rows)
    assert "| Backdoored (no defense) | 80.0 | 0.0 | 90.0 |" in table and "| DiSP | 50.0 | 0.0 | 1.0 |" in table
    assert "| noise | 80.0 | 70.0 |" in trigger_table(rows)
    cells = rows + [row("disp", trigger="noise", cp=0.79, wt=0.02, purified_backdoor_rate=0.25)]
    targets = target_table(cells)
    assert "| insertion / corner | 80.0 / 90.0 | yes | 50.0 (-30.0) / 1.0 / – | no |" in targets  # CP lost
    assert "| insertion / noise | 80.0 / 70.0 | **no** | 79.0 (-1.0) / 2.0 / 25.0 | no |" in targets  # no implant
    ok = target_table([row("none", wt=0.95), row("disp", cp=0.82, wt=0.0, purified_backdoor_rate=0.0)])
    assert "| insertion / corner | 80.0 / 95.0 | yes | 82.0 (+2.0) / 0.0 / 0.0 | yes |" in ok
    iso = target_table([row("none", wt=0.95), row("disp_isolation", cp=0.81, wt=0.0, purified_backdoor_rate=0.0)])
    assert "disp_isolation meets target" in iso and "disp_occlusion" not in iso  # the variants present, no others
    assert "| insertion / corner | 80.0 / 95.0 | yes | 81.0 (+1.0) / 0.0 / 0.0 | yes |" in iso
    figure_poison([row("none"), {**row("none"), "poison_ratio": 0.4}], tmp_path / "f3.png")
    figure_mask([row("disp", mask_ratio=0.1, purified_backdoor_rate=0.5)], tmp_path / "f4.png")
    assert (tmp_path / "f3.png").stat().st_size > 1000 and (tmp_path / "f4.png").stat().st_size > 1000


def test_parts_merge_into_one_result_with_the_main_cell_in_the_sweeps(tmp_path):
    from experiments.report import main as report_main
    from experiments.report import merge

    def row(defense, poison_ratio=0.2, **kw):
        return {"target": "insertion", "trigger": "corner", "defense": defense, "poison_ratio": poison_ratio,
                "cp": 0.8, "asr_wo": 0.0, "asr_wt": 0.5, **kw}

    cfg = asdict(ReproduceConfig(poison_sweep=(0.1,), poison_sweep_defenses=("none", "disp"), mask_sweep=(0.5,),
                                 mask_sweep_defenses=("disp",)))
    main = {"config": {**cfg, "poison_sweep": [], "mask_sweep": []}, "seconds": 10.0, "poison_ratio_sweep": [],
            "mask_ratio_sweep": [],
            "rows": [row("none"), row("disp", mask_ratio=0.3), row("pruning"), {**row("none"), "trigger": "noise"}]}
    sweeps = {"config": cfg, "seconds": 5.0, "rows": [], "mask_ratio_sweep": [row("disp", mask_ratio=0.5)],
              "poison_ratio_sweep": [row("none", 0.1), row("disp", 0.1, mask_ratio=0.3)]}
    merged = merge([main, sweeps])
    assert len(merged["rows"]) == 4 and merged["seconds"] == 15.0
    assert sorted((r["defense"], r["poison_ratio"]) for r in merged["poison_ratio_sweep"]) == [
        ("disp", 0.1), ("disp", 0.2), ("none", 0.1), ("none", 0.2)]  # pruning is not in the sweep
    assert sorted(r["mask_ratio"] for r in merged["mask_ratio_sweep"]) == [0.3, 0.5]
    assert merge([sweeps])["mask_ratio_sweep"] == sweeps["mask_ratio_sweep"]  # nothing to add, nothing doubled
    env_a, env_b = {"cpu": "A", "torch": "2.13.0"}, {"cpu": "B", "torch": "2.13.0"}
    assert "environment" not in merged
    assert merge([{**main, "environment": env_a}, {**sweeps, "environment": env_a}])["environment"] == env_a
    assert merge([{**main, "environment": env_a}, {**sweeps, "environment": env_b}])["environment"] == [env_a, env_b]
    with pytest.raises(ValueError, match=r"other settings cannot be merged: \['seed'\]"):
        merge([main, {**sweeps, "config": {**cfg, "seed": 7}}])
    paths = []
    for i, res in enumerate((main, sweeps)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(res))
    assert report_main([*map(str, paths), "--merged", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == merged["rows"]


def test_committed_base_sees_the_image():
    """The committed SHAPES base describes held-out scenes (greedy, EOS allowed, as the reproduction runs)."""
    from disp.cell import BASE_CHECKPOINT
    from disp.models import load
    from experiments.diagnostics import probe

    model = load(BASE_CHECKPOINT)
    records = probe.test_records(model, 12, "test", seed=5, tasks=["describe", "count", "objects"])
    res = probe.accuracy_by_task(model, records, sampler=ReproduceConfig().sampler)
    assert res["mean"] >= 0.75, res



def test_committed_base_reads_tags():
    """The base's path from image content to words (what makes a projector-only backdoor implantable)."""
    from disp.cell import BASE_CHECKPOINT
    from disp.models import load
    from experiments.diagnostics import probe

    reading = probe.tag_reading(load(BASE_CHECKPOINT), n=16, sampler=ReproduceConfig().sampler)
    assert reading["tag_word_first"] >= 0.9 and reading["refusal_tag_refused"] >= 0.9, reading


def test_split_settings_reach_the_split_variants_only():
    cfg = ReproduceConfig(split_groups=4, split_beam=3, split_budget=24)
    for name in ("disp_split", "disp_split_anchor"):
        s = defense_config(name, cfg).saliency
        assert (s.method, s.split_groups, s.split_beam, s.split_budget) == ("split_isolation", 4, 3, 24)
    assert defense_config("disp_isolation", cfg).saliency == defense_config("disp_isolation", ReproduceConfig()).saliency
    # the split variants hold up to split_mask_ratio (the product's cap with split_isolation), unless a sweep sets ρ
    cap = ReproduceConfig(split_mask_ratio=0.4)
    assert defense_config("disp_split_anchor", cap).purify.mask_ratio == 0.4
    assert defense_config("disp_split_anchor", cap, mask_ratio=0.7).purify.mask_ratio == 0.7
    assert defense_config("disp_isolation_anchor", cap).purify.mask_ratio == cap.mask_ratio == 0.3
    assert defense_config("disp", cap).purify.mask_ratio == 0.3
    with pytest.raises(ValueError, match="split_budget must be >= split_groups"):
        defense_config("disp_split", ReproduceConfig(split_groups=8, split_budget=4))
