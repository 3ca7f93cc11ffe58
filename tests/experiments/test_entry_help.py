"""The lab's entry points print their help for -h and start nothing (no run into a folder named `-h`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "experiments" / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_print_their_usage_for_help_and_run_nothing(script, tmp_path):
    for flag in ("-h", "--help"):
        out = subprocess.run(
            ["bash", str(script), flag], cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert (
            out.returncode == 0
            and "Usage: " in out.stdout
            and f"experiments/scripts/{script.name} OUT_DIR" in out.stdout
        ), out
        assert not out.stdout.startswith("#!") and "set -u" not in out.stdout  # the header, not the code
    missing = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "Usage:" in missing.stdout
    assert list(tmp_path.iterdir()) == []  # nothing created, no `-h` folder


@pytest.mark.slow  # imports torch in a subprocess: a few seconds
def test_pretrain_prints_its_help(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "-h"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m experiments.pretrain"), out.stderr
    assert "--steps" in out.stdout and list(tmp_path.iterdir()) == []
