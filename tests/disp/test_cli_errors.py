"""The command line's user errors end in one line naming the problem (no traceback), Ctrl-C in exit 130, and
its help lists choices, uses plain metavars, has a text for every flag and loads no torch."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disp.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--gen-length", "8", "--block-length", "8", "--steps", "8"]


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "disp.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def one_line_error(err: str, command: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"disp {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for the top parser and every subcommand, the service's included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*prefix, name))


def test_every_flag_and_subcommand_has_help_with_plain_metavars_and_choices():
    found = list(parsers(build_parser()))
    assert {("jobs", "submit"), ("defend",), ("data", "check"), ("keys", "revoke")} <= {c for c, _ in found}
    for command, parser in found:
        text = parser.format_help()
        assert "__" not in text, (command, text)  # no SALIENCY__PROBES-style metavars
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                assert helped == set(action.choices), (command, set(action.choices) - helped)
                continue
            assert action.help and action.help.strip(), (command, action.option_strings or action.dest)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (command, action.dest)
    poison = dict(found)[("poison",)].format_help()
    assert (
        "{insertion,refusal,misclassification}" in poison and "{corner,center,noise,multi,blended}" in poison
    )
    assert "--probes PROBES" in dict(found)[("defend",)].format_help()


@pytest.mark.parametrize("argv", [["--help"], ["defend", "--help"], ["jobs", "submit", "--help"]])
def test_help_loads_no_torch(argv):
    code = "\n".join(
        [
            "import sys",
            "from disp.cli import main",
            "try:",
            f"    main({argv!r})",
            "except SystemExit as e:",
            "    assert e.code == 0",
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy', 'PIL') if m in sys.modules]",
            "print('LOADED', heavy)",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert "usage: disp" in out and out.strip().endswith("LOADED []"), out


def test_empty_dataset_and_outputs_that_are_files(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": []}))
    base = ["--checkpoint", str(tiny_dir)]
    cases = [
        (
            ["defend", *base, "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "o")],
            "defend",
            ["empty.json", "no records"],
        ),
        (
            ["score", *base, "--data", str(tmp_path / "captions.json"), "--out", str(tmp_path / "s.json")],
            "score",
            ["captions.json", "no records"],
        ),
        (
            [
                "poison",
                "--data",
                str(tmp_path / "empty.json"),
                "--target",
                "insertion",
                "--trigger",
                "corner",
                "--out",
                str(tmp_path / "p"),
            ],
            "poison",
            ["empty.json", "no records"],
        ),
        (
            ["defend", *base, "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path / "a-file")],
            "defend",
            ["--out", "a-file", "is a file"],
        ),
        (["init-tiny", "--out", str(tmp_path / "a-file")], "init-tiny", ["--out", "a-file", "is a file"]),
        (["demo", "--workdir", str(tmp_path / "a-file")], "demo", ["--workdir", "is a file"]),
        (
            ["score", *base, "--data", str(tmp_path / "empty.json"), "--out", str(tmp_path)],
            "score",
            ["--out", "is a directory"],
        ),
    ]
    for argv, command, needles in cases:
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, command, *needles)
    assert (tmp_path / "a-file").read_text() == "not a folder"  # nothing written over it


def test_a_device_this_machine_lacks_is_named(tmp_path, tiny_dir, solid_images, capsys):
    import torch

    solid_images[0].save(tmp_path / "img.png")
    argv = ["generate", "--checkpoint", str(tiny_dir), "--image", str(tmp_path / "img.png"), "--prompt", "hi"]
    assert main([*argv, "--device", "gpu"]) == 2
    one_line_error(capsys.readouterr().err, "generate", "unknown device 'gpu'")
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main([*argv, "--device", missing]) == 2
    one_line_error(capsys.readouterr().err, "generate", f"device '{missing}'", "GPU")


def test_a_missing_extra_is_named(monkeypatch, tiny_dir, capsys):
    """Without torch installed (here: its import refused) a model command names the extra to install."""
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert main(["generate", "--checkpoint", str(tiny_dir), "--image", "x.png", "--prompt", "hi"]) == 2
    one_line_error(capsys.readouterr().err, "generate", "needs torch", "pip install 'disp[torch]'")


@pytest.mark.slow  # two runs of `disp defend` in subprocesses: about 10 s on an idle 2-core machine
def test_ctrl_c_exits_130_and_a_rerun_resumes(tmp_path, tiny_dir):
    """SIGINT while purifying: exit 130 with one line; the re-run starts at purifying (scoring is kept)."""
    from disp.shapes import ShapesConfig, write_dataset

    paths = write_dataset(
        tmp_path / "shapes", ShapesConfig(), sizes={"train": 6, "val": 1, "test": 1}, seed=0
    )
    argv = [
        sys.executable,
        "-m",
        "disp.cli",
        "defend",
        "--checkpoint",
        str(tiny_dir),
        "--data",
        str(paths["train"]),
        "--out",
        str(tmp_path / "out"),
        "--epochs",
        "1",
        "--workers",
        "1",
        "--probes",
        "1",
        "--purify-batch-size",
        "1",
        *FAST,
    ]

    def interrupt_at(stage: str) -> tuple[int, list[str]]:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        seen = []
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # not a terminal: plain progress lines, no \r
            seen.append(line.rstrip("\n"))
            if line.startswith(stage + " ") or time.monotonic() > deadline:
                proc.send_signal(signal.SIGINT)
                break
        seen += proc.stderr.read().splitlines()
        return proc.wait(60), seen

    rc, lines = interrupt_at("purifying")
    assert rc == 130, lines
    assert lines[-1] == "disp defend: interrupted; re-run to resume" and not any(
        "Traceback" in x for x in lines
    )
    assert any(x.startswith("scoring 6/6") for x in lines) and all("\r" not in x for x in lines)
    rc, lines = interrupt_at("purifying")
    assert rc == 130, lines
    assert not any(x.startswith("scoring") for x in lines), lines  # the finished stage was not run again
