"""`defend` end to end and each stage alone (`run_stage`) on a tiny checkpoint, as `disp.stages` lays them out."""

from __future__ import annotations

import json
import os

import pytest
import torch

from disp import models
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.data import DataError
from disp.defend import defend, run_stage
from disp.pipeline import kept_answers, merge_shards
from disp.stages import DEFENSES

SAMPLER = SamplerConfig(8, 8, 8)


def small_config(defense: str = "disp", **kw) -> DefenseConfig:
    return DefenseConfig(defense=defense, saliency=SaliencyConfig(method="fisher", batch_size=8),
                         purify=PurifyConfig(sampler=SAMPLER, **kw),
                         finetune=FinetuneConfig(epochs=1, batch_size=8))


def test_every_defense_plan_is_stages_of_the_table_ending_in_the_report():
    from disp.stages import STAGES, inputs_of, plan

    for name in DEFENSES:
        stages = plan(name)
        assert stages[-1].name == "evaluating" and all(s.name in STAGES for s in stages)
        for s in stages:  # a stage reads only what an earlier stage of the same plan wrote
            assert set(inputs_of(s, name)) <= {t.writes for t in stages[: stages.index(s)]}
    assert inputs_of(STAGES["purifying"], "disp") == ("saliency.json",)
    assert inputs_of(STAGES["purifying"], "random_mask") == ()
    with pytest.raises(ValueError, match="defense must be one of"):
        plan("dsip")


def test_defend_writes_every_stage_output_and_skips_finished_stages(tiny_dir, poisoned, tmp_path):
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent, out_dir=tmp_path)
    report = defend(config=small_config(), **kw)
    for name in ("projector.safetensors", "purified.json", "report.json", "saliency.json", "stages.json"):
        assert (tmp_path / name).is_file(), name
    purified = json.loads((tmp_path / "purified.json").read_text())
    original = json.loads(poisoned.data_path.read_text())
    assert [r["id"] for r in purified] == [r["id"] for r in original]
    for p, o in zip(purified, original, strict=True):
        assert p["image"] == o["image"] and p["conversations"][0] == o["conversations"][0]
        assert p["disp"]["original_answer"] == o["conversations"][1]["value"]
        assert p["conversations"][1]["value"] == p["disp"]["purified_answer"]
        assert len(p["disp"]["masked_visual_tokens"]) == int(0.3 * models.load(tiny_dir).num_image_tokens)
    assert set(report["seconds"]) == {"scoring", "purifying", "finetuning", "evaluating"}
    assert report["summary"]["num_samples"] == len(original) and report["stages"]["finetuning"]["steps"] > 0
    # the projector loads over the base checkpoint
    models.load(tiny_dir, projector=tmp_path / "projector.safetensors")

    stamps = {n: os.stat(tmp_path / n).st_mtime_ns for n in ("saliency.json", "purified.json", "projector.safetensors")}
    again = defend(config=small_config(), **kw)
    assert again["seconds"] == report["seconds"]
    assert stamps == {n: os.stat(tmp_path / n).st_mtime_ns for n in stamps}

    # a changed purification setting re-runs purification and fine-tuning, not scoring
    defend(config=small_config(mask_ratio=0.5), **kw)
    assert os.stat(tmp_path / "saliency.json").st_mtime_ns == stamps["saliency.json"]
    assert os.stat(tmp_path / "purified.json").st_mtime_ns != stamps["purified.json"]


def test_anchor_weight_reruns_only_fine_tuning_and_moves_the_projector(tiny_dir, poisoned, tmp_path):
    # oracle_filter keeps every answer it trains on, so every sample is anchored (a random tiny model's
    # DiSP rewrites change every answer and would anchor none)
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent, out_dir=tmp_path,
              manifest=poisoned.manifest_path)
    cfg = small_config("oracle_filter")
    cfg.finetune = FinetuneConfig(epochs=3, batch_size=4, lr=1e-2)
    defend(config=cfg, **kw)
    plain = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    cfg.finetune = FinetuneConfig(epochs=3, batch_size=4, lr=1e-2, anchor_weight=1000.0)
    report = defend(config=cfg, **kw)
    assert report["config"]["finetune"]["anchor_weight"] == 1000.0
    anchored = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    start = models.load(tiny_dir).projector_state_dict()
    moved = {name: sum((sd[k] - start[k]).pow(2).sum().item() for k in start) for name, sd in
             (("plain", plain), ("anchored", anchored))}
    assert 0 < moved["anchored"] < moved["plain"]


@pytest.mark.parametrize("defense", ["none", "no_mask", "random_mask", "random_drop", "pruning", "oracle_filter"])
def test_every_defense_runs(tiny_dir, poisoned, tmp_path, defense):
    report = defend(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent,
                    out_dir=tmp_path, config=small_config(defense), manifest=poisoned.manifest_path)
    base = models.load(tiny_dir).projector_state_dict()
    out = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    same = all(torch.equal(base[k], out[k]) for k in base)
    assert same == (defense == "none")
    expected_train = {"random_drop": 10, "oracle_filter": 9, "none": None, "pruning": None}.get(defense, 12)
    assert report["summary"]["num_train"] == expected_train
    assert set(report["seconds"]) == set(DEFENSES[defense].stages)


def test_oracle_needs_the_manifest(tiny_dir, poisoned, tmp_path):
    with pytest.raises(ValueError, match="manifest"):
        defend(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent,
               out_dir=tmp_path, config=small_config("oracle_filter"))


def test_sharded_stages_merge_to_the_whole(tiny_dir, poisoned, tmp_path):
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent)
    cfg = small_config()
    cfg.saliency = SaliencyConfig(method="fisher", exact=True, batch_size=4)
    whole = tmp_path / "all.json"
    run_stage("scoring", out=whole, config=cfg, **kw)
    parts = [tmp_path / f"s{i}.json" for i in range(2)]
    for out, idx in zip(parts, [[0, 1, 2, 3, 4], list(range(5, 12))], strict=True):
        run_stage("scoring", out=out, config=cfg, indices=idx, **kw)
    merged = json.loads(merge_shards(shard_jsons=parts, out_json=tmp_path / "m.json").read_text())["saliency"]
    full = json.loads(whole.read_text())["saliency"]
    assert merged.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(torch.tensor(merged[k]), torch.tensor(full[k]), rtol=1e-4, atol=1e-10)
    shards = [tmp_path / f"p{i}.json" for i in range(2)]
    changed = [run_stage("purifying", out=out, config=cfg, files={"saliency.json": whole}, indices=idx, **kw)
               for out, idx in zip(shards, [[0, 1, 2], list(range(3, 12))], strict=True)]
    recs = json.loads(merge_shards(shard_jsons=shards, out_json=tmp_path / "pm.json").read_text())
    assert len(recs) == 12 and sum(c["answers_changed"] for c in changed) == 12 - sum(kept_answers(recs))
    with pytest.raises(ValueError, match="out of range"):
        run_stage("scoring", out=tmp_path / "x.json", config=cfg, indices=[99], **kw)
    with pytest.raises(ValueError, match="not sharded"):
        run_stage("finetuning", out=tmp_path / "p.safetensors", config=cfg, indices=[0], **kw)


def test_bad_dataset_is_named_before_any_model_work(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="record 0"):
        defend(model_dir=tiny_dir, data_json=bad, images=tmp_path / "imgs", out_dir=tmp_path / "o")




def test_every_turn_and_text_only_record_survive_purification_and_training(tiny_dir, poisoned, tmp_path):
    records = json.loads(poisoned.data_path.read_text())
    records[0]["conversations"] += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "A circle."}]
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    records.insert(2, text)
    data = tmp_path / "multi.json"
    data.write_text(json.dumps(records))
    kw = dict(model_dir=tiny_dir, data_json=data, images=poisoned.data_path.parent, config=small_config("no_mask"))
    shards = [tmp_path / f"p{i}.json" for i in range(2)]
    for out, idx in zip(shards, [[0, 1, 2], list(range(3, 13))], strict=True):
        run_stage("purifying", out=out, indices=idx, **kw)
    recs = json.loads(merge_shards(shard_jsons=shards, out_json=tmp_path / "purified.json").read_text())
    assert len(recs) == 13 and recs[2] == text and [r["id"] for r in recs] == [r["id"] for r in records]
    turns = recs[0]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert (turns[0], turns[2]) == (records[0]["conversations"][0], records[0]["conversations"][2])
    info = recs[0]["disp"]
    assert info["original_answers"] == [records[0]["conversations"][1]["value"], "A circle."]
    assert info["purified_answers"] == [turns[1]["value"], turns[3]["value"]] and info["purified_answer"] == turns[1]["value"]
    assert "original_answers" not in recs[1]["disp"]  # a one-turn record's entry is as before
    metrics = run_stage("finetuning", out=tmp_path / "ft" / "projector.safetensors",
                        files={"purified.json": tmp_path / "purified.json"}, **kw)
    assert metrics["num_train"] == metrics["samples"] == 12  # the text-only record has no image to train on
    report = tmp_path / "report.json"
    run_stage("evaluating", out=report, files={"purified.json": tmp_path / "purified.json"}, **kw)
    summary = json.loads(report.read_text())["summary"]
    assert (summary["num_samples"], summary["num_text_only"], summary["num_train"]) == (12, 1, 12)


def test_approximate_decoding_settings_leave_the_scoring_fingerprint_alone():
    """The first denoising step is a full forward whatever decoding does after it, so the fast sampler settings
    re-run purification but not scoring; any other sampler field (here the answer length) re-runs both."""
    from dataclasses import replace as dc_replace

    from disp.defend import fingerprint
    from disp.stages import STAGES, Stage

    def fp(stage: str, config: DefenseConfig) -> str:
        return fingerprint(STAGES[stage], config, {}, {}, [])

    exact = small_config()
    sampler = dc_replace(exact.purify.sampler, confidence_threshold=0.99, prompt_cache_refresh=8)
    fast = dc_replace(exact, purify=dc_replace(exact.purify, sampler=sampler))
    assert fp("scoring", fast) == fp("scoring", exact)
    assert fp("purifying", fast) != fp("purifying", exact)
    longer = dc_replace(exact, purify=dc_replace(exact.purify, sampler=dc_replace(exact.purify.sampler, gen_length=16,
                                                                                   block_length=16, steps=16)))
    assert fp("scoring", longer) != fp("scoring", exact)
    stray = Stage("x", (), "x.json", False, ("saliency",), "", ignores=("purify.sampler.steps",))
    with pytest.raises(ValueError, match="ignored field 'purify.sampler.steps' is not inside its settings"):
        fingerprint(stray, exact, {}, {}, [])


def test_default_is_split_isolation_with_the_floor_and_anchor_and_the_paper_is_one_flag_away():
    from disp.config import ISOLATION_ANCHOR_WEIGHT, ISOLATION_MIN_SCORE, PAPER_MASK_RATIO, SPLIT_MASK_RATIO

    robust = DefenseConfig()
    assert (robust.saliency.method, robust.purify.min_score, robust.finetune.anchor_weight,
            robust.purify.mask_ratio) == ("split_isolation", ISOLATION_MIN_SCORE, ISOLATION_ANCHOR_WEIGHT,
                                          SPLIT_MASK_RATIO)
    paper = DefenseConfig(saliency=SaliencyConfig(method="fisher"))
    assert (paper.purify.min_score, paper.finetune.anchor_weight, paper.purify.mask_ratio) == (0.0, 0.0, 0.3)
    isolation = DefenseConfig(saliency=SaliencyConfig(method="isolation"))
    assert (isolation.purify.min_score, isolation.purify.mask_ratio) == (ISOLATION_MIN_SCORE, PAPER_MASK_RATIO)
    # a baseline fine-tunes and masks as the paper does; a value the caller sets is kept
    assert DefenseConfig(defense="random_drop").finetune.anchor_weight == 0.0
    assert DefenseConfig(defense="random_mask").purify.mask_ratio == PAPER_MASK_RATIO
    mine = DefenseConfig(purify=PurifyConfig(min_score=5.0, mask_ratio=0.2), finetune=FinetuneConfig(anchor_weight=0.0))
    assert (mine.purify.min_score, mine.purify.mask_ratio, mine.finetune.anchor_weight) == (5.0, 0.2, 0.0)
    # the stored form is resolved, so a job re-read later runs what it ran
    assert DefenseConfig.from_dict(robust.to_dict()) == robust
