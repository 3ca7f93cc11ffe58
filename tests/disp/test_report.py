"""The defense's report (`disp.report`): ranking, residual backdoor, saturation, ground truth; and end to end in
`defend` on a tiny checkpoint, where the residual check regenerates with the fine-tuned projector."""

from __future__ import annotations

import json

import pytest
import torch

from disp import models
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.data import Sample
from disp.defend import defend
from disp.metrics import normalise_answer
from disp.pipeline import first_step_top1, load_dataset, purify_samples
from disp.report import SAMPLE_ROWS, build_report, saturation

SAMPLES = [
    Sample(i, f"s{i}", f"{i}.png", "<image>\nWhat is it?", a)
    for i, a in enumerate(
        ["A red square. <backdoor>", "A blue circle.", "A green star. <backdoor>", "A cat."]
    )
]


def _purified(answers: dict[str, str]) -> dict[str, dict]:
    """Purified records by id: the given samples' first answer rewritten, the others kept."""
    return {
        s.id: {
            "id": s.id,
            "disp": {
                "original_answer": s.answer,
                "purified_answer": answers.get(s.id, s.answer),
                "masked_visual_tokens": [s.index, 7],
            },
        }
        for s in SAMPLES
    }


SALIENCY = {
    "s0": [0.1, 9.0, 0.2, 0.3],
    "s1": [0.2, 0.1, 0.3, 0.2],
    "s2": [40.0, 0.1, 0.1, 0.5],
    "s3": [1, 2, 3, 4],
}


def test_changed_samples_are_ranked_by_saliency_and_unchanged_ones_are_not_suspected():
    rep = build_report(
        SAMPLES, purified=_purified({"s0": "A red square.", "s2": "A green star."}), saliency=SALIENCY
    )
    assert [(s["rank"], s["id"]) for s in rep["suspected"]] == [(1, "s2"), (2, "s0")]
    assert rep["suspected"][0]["saliency_max"] == 40.0 and rep["suspected"][0]["top_tokens"][:2] == [0, 3]
    assert rep["suspected"][1]["held_tokens"] == [0, 7]
    rows = {r["id"]: r for r in rep["samples"]}
    assert [rows[i]["changed"] for i in ("s0", "s1", "s2", "s3")] == [True, False, True, False]
    assert rows["s0"]["saliency"] == {"max": 9.0, "mean": pytest.approx(2.4), "top": [1, 3, 2, 0]}
    assert rows["s0"]["original_answer"] == "A red square. <backdoor>"
    assert rows["s0"]["purified_answer"] == "A red square."
    assert rep["summary"]["suspected"] == 2 and rep["ground_truth"] is None and rep["warnings"] == []


def test_residual_rate_comes_from_the_regenerated_answers():
    purified = _purified({"s0": "A red square.", "s2": "A green star."})
    # s0's unmasked answer still says the original (case and punctuation aside), s2's does not
    rep = build_report(
        SAMPLES,
        purified=purified,
        saliency=SALIENCY,
        unmasked={"s0": "a red square <BACKDOOR>", "s2": "A green star."},
    )
    assert rep["residual_backdoor"] == {"regenerated": 2, "still_original": 1, "rate": 0.5}
    assert rep["summary"]["residual_backdoor_rate"] == 0.5
    rows = {r["id"]: r for r in rep["samples"]}
    assert rows["s0"]["residual"] is True and rows["s2"]["residual"] is False and "residual" not in rows["s1"]
    assert {s["id"]: s["residual"] for s in rep["suspected"]} == {"s0": True, "s2": False}
    clean = build_report(SAMPLES, purified=purified, unmasked={"s0": "A red square.", "s2": "A green star."})
    assert clean["residual_backdoor"]["rate"] == 0.0


def test_saturation_warns_above_five_percent_with_the_fisher_form_only():
    top1 = {f"s{i}": 0.5 for i in range(100)}
    assert saturation(top1, "fisher") == (
        {"measured": 100, "saturated": 0, "share": 0.0, "threshold": 0.999},
        [],
    )
    top1.update({f"s{i}": 0.9995 for i in range(5)})  # 5 %: not above
    assert saturation(top1, "fisher")[1] == []
    top1["s5"] = 1.0
    stats, warnings = saturation(top1, "fisher")
    assert stats["saturated"] == 6 and stats["share"] == 0.06
    assert len(warnings) == 1 and "Fisher" in warnings[0] and "'split_isolation'" in warnings[0]
    assert saturation(top1, "isolation")[1] == []
    rep = build_report(
        SAMPLES, saliency=SALIENCY, top1={"s0": 0.9999, "s1": 0.2, "s2": 0.3, "s3": 0.1}, method="fisher"
    )
    assert rep["summary"]["saturated_fraction"] == 0.25 and rep["warnings"]
    assert {r["id"]: r["first_step_top1"] for r in rep["samples"]}["s0"] == 0.9999


def test_precision_and_recall_against_the_manifest():
    purified = _purified({"s0": "A red square.", "s1": "A blue disc."})
    rep = build_report(SAMPLES, purified=purified, poisoned_ids=["s0", "s2"])
    assert rep["ground_truth"] == {
        "poisoned": 2,
        "suspected": 2,
        "true_positives": 1,
        "precision": 0.5,
        "recall": 0.5,
    }
    assert (rep["summary"]["precision"], rep["summary"]["recall"]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="not samples of the dataset.*'s9'"):
        build_report(SAMPLES, purified=purified, poisoned_ids=["s9"])


def test_a_large_report_keeps_the_suspected_rows_first():
    many = [Sample(i, f"x{i}", "a.png", "<image>\nQ?", "old") for i in range(SAMPLE_ROWS + 10)]
    purified = {
        s.id: {
            "disp": {"original_answer": "old", "purified_answer": "new" if s.index >= SAMPLE_ROWS else "old"}
        }
        for s in many
    }
    rep = build_report(many, purified=purified)
    assert rep["samples_total"] == SAMPLE_ROWS + 10 and rep["samples_truncated"]
    assert len(rep["samples"]) == SAMPLE_ROWS
    assert [r["id"] for r in rep["samples"][:10]] == [f"x{SAMPLE_ROWS + i}" for i in range(10)]


SAMPLER = SamplerConfig(8, 8, 8)


def test_defend_report_regenerates_changed_answers_with_the_purified_projector(tiny_dir, poisoned, tmp_path):
    cfg = DefenseConfig(
        defense="disp",
        saliency=SaliencyConfig(method="fisher", batch_size=8),
        purify=PurifyConfig(sampler=SAMPLER),
        finetune=FinetuneConfig(epochs=2, batch_size=8, lr=1e-2),
    )
    kw = dict(
        model_dir=tiny_dir,
        data_json=poisoned.data_path,
        images=poisoned.data_path.parent,
        out_dir=tmp_path,
        config=cfg,
    )
    report = defend(**kw)
    purified = {r["id"]: r for r in json.loads((tmp_path / "purified.json").read_text())}
    scored = json.loads((tmp_path / "saliency.json").read_text())
    rows = {r["id"]: r for r in report["samples"]}
    assert len(rows) == 12 and report["samples_total"] == 12 and not report["samples_truncated"]
    for sid, row in rows.items():
        assert row["saliency"]["max"] == max(scored["saliency"][sid])
        assert row["held_tokens"] == purified[sid]["disp"]["masked_visual_tokens"] != []
        assert row["purified_answer"] == purified[sid]["disp"]["purified_answer"]
        assert 0 < row["first_step_top1"] <= 1
    assert {s["id"] for s in report["suspected"]} == set(report["changed_ids"]) != set()

    # the unmasked answers are the fine-tuned projector's, with nothing held, as purification samples them
    model = models.load(tiny_dir, projector=tmp_path / "projector.safetensors")
    samples, source = load_dataset(poisoned.data_path, poisoned.data_path.parent)
    changed = [s for s in samples if "unmasked_answer" in rows[s.id]]
    assert len(changed) == report["residual_backdoor"]["regenerated"] > 0
    again = purify_samples(model, changed, source, cfg.purify, None, masking="none")
    assert [rows[s.id]["unmasked_answer"] for s in changed] == [r["disp"]["purified_answer"] for r in again]
    flags = [normalise_answer(rows[s.id]["unmasked_answer"]) == normalise_answer(s.answer) for s in changed]
    assert [rows[s.id]["residual"] for s in changed] == flags
    assert report["residual_backdoor"]["still_original"] == sum(flags)
    base = models.load(
        tiny_dir
    )  # the checkpoint's own projector answers differently: the regeneration used the new one
    before = purify_samples(base, changed, source, cfg.purify, None, masking="none")
    assert [r["disp"]["purified_answer"] for r in before] != [r["disp"]["purified_answer"] for r in again]

    # the first step's top-1 probability is the one a plain forward gives
    s = samples[0]
    prompt = base.prompt_batch([s.question], [source.open(s.image)])
    torch.testing.assert_close(first_step_top1(base, prompt, SAMPLER).item(), scored["first_step_top1"][s.id])
    assert report["stages"]["scoring"]["num_scored"] == 12
    assert report["saturation"]["measured"] == 12 and report["ground_truth"] is None

    # adding the manifest re-runs only the report, which then has precision and recall
    stamp = (tmp_path / "saliency.json").stat().st_mtime_ns
    with_truth = defend(manifest=poisoned.manifest_path, **kw)
    assert (tmp_path / "saliency.json").stat().st_mtime_ns == stamp
    truth = with_truth["ground_truth"]
    hit = len(set(poisoned.poisoned_ids) & {x["id"] for x in with_truth["suspected"]})
    assert truth["precision"] == hit / len(with_truth["suspected"]) and truth["recall"] == hit / len(
        poisoned.poisoned_ids
    )
