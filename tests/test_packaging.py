"""What a user installs: the wheel holds the product (disp, api, worker) and the one base checkpoint the demo
needs; the lab (experiments/) and its checkpoints stay in the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_product_and_one_checkpoint(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("disp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"disp", "api", "worker"}
    checkpoints = {n.rsplit("/", 1)[0] for n in names if n.endswith("model.safetensors")}
    assert checkpoints == {"disp/assets/shapes-base"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[disp.commands]" in text and "api.cli:add_commands" in text
