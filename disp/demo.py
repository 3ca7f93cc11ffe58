"""The demo's inputs and scoring, shared by `disp demo --local` (in-process) and `disp demo` (the service).

The demo is the quick cell (`disp.cell.QUICK_CELL`: 300 SHAPES captions, 20% poisoned with content insertion
behind an 8 px corner patch, seed 1): it implants the backdoor by projector-only fine-tuning of the shipped
SHAPES base, runs DiSP with the cell's settings, and prints CP and ASR before and after, which is what
`tests/experiments/test_quick_bar.py` asserts on the same cell. Without the shipped base (a source tree
without assets) a tiny random checkpoint stands in, and the numbers then only show that the plumbing works.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from disp import progress
from disp.cell import (
    BASE_CHECKPOINT,
    QUICK_CELL,
    Cell,
    CellConfig,
    defense_config,
    evaluate_cell,
    prepare_cell,
)
from disp.config import DefenseConfig
from disp.defend import defend
from disp.models.tiny import write_tiny_checkpoint
from disp.shapes import config_of_checkpoint

TARGET, TRIGGER, POISON_RATIO = "insertion", "corner", 0.2


def demo_config(*, quick: bool = True, n_asr: int | None = None, n_cp: int | None = None) -> CellConfig:
    """The quick cell, evaluated on its 60 + 60 ASR and 100 CP samples, or (quick=False) on the full
    protocol's 200 + 200 and 200; n_asr / n_cp override either."""
    sizes = dict(QUICK_CELL) if quick else {k: v for k, v in QUICK_CELL.items() if k not in ("n_asr", "n_cp")}
    sizes |= {k: v for k, v in (("n_asr", n_asr), ("n_cp", n_cp)) if v is not None}
    return CellConfig(**sizes)


@dataclass
class DemoInputs:
    model_dir: Path  # the base checkpoint
    cell: Cell  # poisoned data (+ manifest, which defenses never read), backdoored projector, held-out sets
    config: CellConfig
    defense: DefenseConfig  # the settings of the DiSP run (the cell's)

    @property
    def poisoned_dir(self) -> Path:
        return self.cell.poisoned_json.parent


def prepare_inputs(workdir: str | Path, *, quick: bool = True, n_asr: int | None = None,
                   n_cp: int | None = None) -> DemoInputs:
    """Poisoned SHAPES captions and a projector backdoored on them by fine-tuning (cached under workdir)."""
    workdir = Path(workdir)
    model_dir = BASE_CHECKPOINT if (BASE_CHECKPOINT / "config.json").is_file() else None
    if model_dir is None:
        model_dir = write_tiny_checkpoint(workdir / "tiny-checkpoint", seed=0)
        print(f"no committed base checkpoint: using a random tiny one at {model_dir}")
    cfg = demo_config(quick=quick, n_asr=n_asr, n_cp=n_cp)
    cell = prepare_cell(workdir / "cell", Path(model_dir), TARGET, TRIGGER, POISON_RATIO, cfg,
                        config_of_checkpoint(model_dir), log=print)
    n_poisoned = len(json.loads(cell.manifest.read_text())["poisoned_ids"])
    n_train = len(json.loads(cell.poisoned_json.read_text()))
    print(f"poisoned {n_poisoned} of {n_train} training captions (content insertion, 8 px corner patch)")
    return DemoInputs(Path(model_dir), cell, cfg, defense_config(cfg))


def evaluate_projectors(inputs: DemoInputs, projectors: dict[str, Path]) -> dict[str, dict]:
    """CP and ASR w/o and w/t (`disp.cell.evaluate_cell`) for each named projector."""
    return {name: evaluate_cell(inputs.model_dir, path, inputs.cell, TARGET, inputs.config)
            for name, path in projectors.items()}


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'model':<18}{'CP':>8}{'ASR w/o':>10}{'ASR w/t':>10}")
    for name, ev in rows.items():
        print(f"{name:<18}{100 * ev['cp']:>7.1f}%{100 * ev['asr_wo']:>9.1f}%{100 * ev['asr_wt']:>9.1f}%")


def run_demo(workdir: str | Path, *, quick: bool = True, n_asr: int | None = None, n_cp: int | None = None) -> dict:
    """The pipeline in this process: prepare, `defend`, evaluate, print."""
    workdir = Path(workdir)
    t0 = time.perf_counter()
    inputs = prepare_inputs(workdir, quick=quick, n_asr=n_asr, n_cp=n_cp)
    report = defend(model_dir=inputs.model_dir, projector=inputs.cell.backdoored, data_json=inputs.cell.poisoned_json,
                    images=inputs.poisoned_dir, out_dir=workdir / "defended", config=inputs.defense,
                    device=inputs.config.torch_device(), workers=None,  # one per core, as the service's worker
                    on_progress=progress.stage_bars())
    rows = evaluate_projectors(inputs, {"backdoored": inputs.cell.backdoored,
                                        "DiSP": workdir / "defended" / "projector.safetensors"})
    print_table(rows)
    print(f"DiSP stages: {report['seconds']}; total {time.perf_counter() - t0:.1f}s; outputs in {workdir}")
    return {"rows": rows, "report": report}
