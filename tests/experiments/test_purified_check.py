import json

import pytest

from experiments.diagnostics.purified_check import cell_report, compare, main


def rec(i, text):
    return {"id": f"train-{i:05d}", "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                      {"from": "gpt", "value": text}]}


def test_compare_counts_clean_rewrites_kept_answers_and_dropped_samples():
    clean = {f"train-{i:05d}": f"caption {i}." for i in range(5)}
    poisoned = {"train-00000", "train-00001"}
    purified = [rec(0, "caption 0. "), rec(1, "<backdoor> caption 1."), rec(2, "caption 2."), rec(3, "wrong.")]
    assert compare(clean, purified, poisoned) == {"poisoned": 2, "poisoned_as_clean": 1, "clean": 2, "clean_kept": 1,
                                                  "poisoned_dropped": 0, "clean_dropped": 1}
    with pytest.raises(ValueError, match="not in the training set, first 'train-00009'"):
        compare(clean, [rec(9, "x")], poisoned)


def test_report_over_a_work_dir(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "data-insertion").mkdir(parents=True)
    (work / "data-insertion" / "train.json").write_text(json.dumps([rec(i, f"caption {i}.") for i in range(4)]))
    cell = work / "insertion-corner-p0.2"
    (cell / "poisoned").mkdir(parents=True)
    (cell / "poisoned" / "manifest.json").write_text(json.dumps({"poisoned_ids": ["train-00001"]}))
    for name, records in {"disp": [rec(0, "caption 0."), rec(1, "<backdoor> caption 1."), rec(2, "caption 2."),
                                   rec(3, "caption 3.")],
                          "oracle_filter": [rec(0, "caption 0."), rec(2, "caption 2."), rec(3, "caption 3.")],
                          "pruning": []}.items():
        (cell / name).mkdir()
        (cell / name / "purified.json").write_text(json.dumps(records))
    report = cell_report(work, cell)
    assert set(report) == {"disp", "oracle_filter"}  # pruning trains on nothing
    assert report["disp"]["poisoned_as_clean"] == 0 and report["disp"]["clean_kept"] == 3
    assert report["oracle_filter"]["poisoned_dropped"] == 1
    assert main([str(work), "--json", str(tmp_path / "out.json")]) == 0
    assert "| insertion-corner-p0.2 | oracle_filter | 0 / 0 | 3 / 3 | 1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["insertion-corner-p0.2"]["disp"]["clean"] == 3
    with pytest.raises(ValueError, match="is not a cell directory"):
        cell_report(work, work / "data-insertion")
