"""The command line: init-tiny, generate, poison, defend, evaluate; clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from disp.cli import main
from disp.shapes import ShapesConfig, write_dataset

FAST = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def test_init_tiny_then_generate(tmp_path, capsys, solid_images):
    assert main(["init-tiny", "--family", "llada-v", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    solid_images[0].save(tmp_path / "img.png")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--image", str(tmp_path / "img.png"),
                 "--prompt", "What is it?", "--json", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and out["steps"] <= 8


def test_poison_defend_evaluate(tiny_dir, tmp_path, capsys):
    paths = write_dataset(tmp_path / "shapes", ShapesConfig(), sizes={"train": 10, "val": 2, "test": 4}, seed=1)
    assert main(["poison", "--data", str(paths["train"]), "--images", str(tmp_path / "shapes"),
                 "--target", "refusal", "--trigger", "noise", "--ratio", "0.2", "--out", str(tmp_path / "p"),
                 "--test-data", str(paths["test"]), "--json"]) == 0
    poison = json.loads(capsys.readouterr().out)
    assert poison["poisoned"] == 2 and poison["samples"] == 10
    assert main(["defend", "--checkpoint", str(tiny_dir), "--data", poison["data"], "--images", str(tmp_path / "p"),
                 "--out", str(tmp_path / "o"), "--epochs", "1", "--probes", "2", "--workers", "2", "--json",
                 *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["defense"] == "disp" and report["config"]["saliency"]["probes"] == 2
    assert main(["evaluate", "--checkpoint", str(tiny_dir), "--projector", str(tmp_path / "o" / "projector.safetensors"),
                 "--target", "refusal", "--clean", poison["test_clean"], "--triggered", poison["test_triggered"],
                 "--json", *FAST]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n_clean"] == 4 and ev["n_triggered"] == 4 and 0 <= ev["asr_wt"] <= 1
    assert sum(ev["triggered_leads"].values()) == 4  # every triggered answer counted once


def test_bad_input_is_one_clear_line(tiny_dir, tmp_path, capsys):
    assert main(["defend", "--checkpoint", str(tiny_dir), "--data", str(tmp_path / "nope.json"), "--images",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["defend", "--checkpoint", str(tiny_dir), "--data", "x.json", "--images", ".", "--out", "o",
                 "--mask-ratio", "1.5"]) == 2
    assert "mask_ratio must be in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--checkpoint", str(tiny_dir), "--data", "x.json", "--images", ".", "--out", "o", "--workers", "-1"])
    assert "--workers: must be a whole number >= 0 (0: one per core), got '-1'" in capsys.readouterr().err
    (tmp_path / "evil.pt").write_bytes(b"not opened")
    assert main(["generate", "--checkpoint", str(tmp_path / "evil.pt"), "--image", "x.png", "--prompt", "hi"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_lavida_end_to_end_through_the_cli(tmp_path, capsys):
    """init-tiny --family lavida, then poison, defend (every stage) and evaluate on it, as for LLaDA-V."""
    model = tmp_path / "lavida"
    assert main(["init-tiny", "--family", "lavida", "--out", str(model)]) == 0
    assert "lavida" in capsys.readouterr().out
    paths = write_dataset(tmp_path / "shapes", ShapesConfig(), sizes={"train": 8, "val": 2, "test": 2}, seed=2)
    assert main(["poison", "--data", str(paths["train"]), "--images", str(tmp_path / "shapes"), "--target",
                 "insertion", "--trigger", "corner", "--ratio", "0.25", "--out", str(tmp_path / "p"),
                 "--test-data", str(paths["test"]), "--json"]) == 0
    poison = json.loads(capsys.readouterr().out)
    assert main(["defend", "--checkpoint", str(model), "--data", poison["data"], "--images", str(tmp_path / "p"),
                 "--out", str(tmp_path / "o"), "--epochs", "1", "--json", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages"]) == {"scoring", "purifying", "finetuning"}
    for name in ("projector.safetensors", "purified.json", "report.json"):
        assert (tmp_path / "o" / name).is_file()
    assert main(["evaluate", "--checkpoint", str(model), "--projector", str(tmp_path / "o" / "projector.safetensors"),
                 "--target", "insertion", "--clean", poison["test_clean"], "--triggered", poison["test_triggered"],
                 "--json", *FAST]) == 0
    assert json.loads(capsys.readouterr().out)["n_triggered"] == 2


def test_every_subcommand_prints_its_help(capsys):
    """Every flag's help renders (argparse reads '%' in help as a format character)."""
    import argparse

    import pytest

    from disp.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield (*prefix, name)
                    yield from commands(sub, (*prefix, name))

    found = list(commands(build_parser()))
    assert ("defend",) in found and ("serve",) in found and not any(c[0] == "bench" for c in found)
    for command in found:
        with pytest.raises(SystemExit) as stop:
            main([*command, "--help"])
        assert stop.value.code == 0, command
        assert "usage: disp " + " ".join(command) in capsys.readouterr().out
