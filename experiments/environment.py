"""What a benchmark's numbers may depend on beyond code and seed.

The same run on another CPU or with other package versions can differ in a few answers, and an implant near
its threshold can tip (docs/reproduction.md), so results record `environment()`.
"""

from __future__ import annotations

import platform
from importlib.metadata import version
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Python, torch, numpy and Pillow versions, the CPU and its vector capability, torch's thread count."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": version("numpy"),
            "pillow": version("pillow"), "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}
