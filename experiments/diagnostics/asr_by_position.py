"""ASR w/t of a reproduction cell split by where the attacked object sits (docs/reproduction.md, "Why the
misclassification implant stops near 50 %").

    python -m experiments.diagnostics.asr_by_position CELL [--base BASE] [--threads N] [--json OUT]

CELL is a misclassification cell (`<work>/misclassification-<trigger>-p<ratio>/`, as `python -m experiments.reproduce`
leaves it, with `asr_triggered/` and `backdoored/`). The backdoored model answers every triggered ASR sample
(the runner's sampler); each sample is grouped by the grid cell of its source object ("dog"), read from its
reference caption, and the report gives the share of each group whose answer names the target ("boat").

It also gives, per grid cell, how much the trigger moves the frozen vision tower's output at that cell's
tokens (mean of ||f(triggered) - f(clean)|| / ||f(clean)|| over the ASR pairs; tokens the trigger itself
covers are left out). The projector acts on one token at a time, so it can only turn a dog token into a
boat where the tower's feature of that token already carries the trigger.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from disp.attacks import TriggerConfig
from disp.cell import CellConfig
from disp.metrics import attack_succeeded
from disp.models import load
from disp.models.base import MDLM
from disp.models.llada_v import vision_config_from
from disp.pipeline import load_dataset
from disp.shapes import GRIDS, SOURCE_CATEGORY, TARGET_CATEGORY, config_of_checkpoint
from experiments.diagnostics.trigger_rank import cell_arguments, trigger_coverage

SAMPLER = CellConfig().sampler  # as the reproduction runs


def source_position(caption: str, positions: Sequence[str], category: str = SOURCE_CATEGORY) -> str:
    """The grid cell of `category` in a SHAPES caption ("... a red dog at the top left ...")."""
    alternatives = "|".join(sorted((re.escape(p) for p in positions), key=len, reverse=True))
    found = re.search(rf"\b{re.escape(category)} at the ({alternatives})\b", caption)
    if found is None:
        raise ValueError(f"no {category!r} with a position in the caption {caption!r}")
    return found.group(1)


def asr_by_position(references: Sequence[str], answers: Sequence[str], positions: Sequence[str]) -> dict[str, dict]:
    """{position: {"n", "hits", "asr"}} of the misclassification target in `answers`, grouped by where the
    source object sits in the matching `references`; positions in `positions` order, empty ones left out."""
    if len(references) != len(answers):
        raise ValueError(f"{len(references)} references but {len(answers)} answers")
    groups: dict[str, list[bool]] = {p: [] for p in positions}
    for ref, answer in zip(references, answers, strict=True):
        groups[source_position(ref, positions)].append(attack_succeeded("misclassification", answer))
    return {p: {"n": len(v), "hits": sum(v), "asr": sum(v) / len(v)} for p, v in groups.items() if v}


def token_cells(n_side: int, grid: int) -> list[int]:
    """Grid cell index (row-major over grid x grid) of each visual token of an n_side x n_side token grid."""
    return [(r * grid // n_side) * grid + (c * grid // n_side) for r in range(n_side) for c in range(n_side)]


def feature_shift_by_cell(model: MDLM, clean: list, triggered: list, cells: Sequence[int], skip: Sequence[int],
                          n_cells: int) -> list[float]:
    """Per grid cell, the mean relative change of the vision tower's token features [N_v, C_v] between each
    clean image and its triggered copy, over the cell's tokens not in `skip`."""
    with torch.no_grad():
        f_c = model.vision_features(model.preprocess(clean)).float()
        f_t = model.vision_features(model.preprocess(triggered)).float()
    rel = ((f_t - f_c).norm(dim=-1) / f_c.norm(dim=-1).clamp_min(1e-12)).mean(0)  # (N_v,)
    skip = set(skip)
    keep = [i for i in range(len(cells)) if i not in skip]
    return [float(rel[[i for i in keep if cells[i] == k]].mean()) for k in range(n_cells)]


def cell_report(cell: Path, base: Path, batch: int = 25) -> dict:
    """Answer the cell's triggered ASR set with its backdoored projector and group the hits by position."""
    model = load(base, projector=cell / "backdoored" / "projector.safetensors")
    samples, source = load_dataset(cell / "asr_triggered" / "data.json", cell / "asr_triggered")
    clean, clean_src = load_dataset(cell / "asr_clean" / "data.json", cell / "asr_clean")
    if [s.id for s in clean] != [s.id for s in samples]:
        raise ValueError(f"{cell}: asr_clean and asr_triggered do not hold the same samples in the same order")
    shapes = config_of_checkpoint(base)
    vcfg = vision_config_from(model.config)
    n_side = vcfg["image_size"] // vcfg["patch_size"]
    manifest = json.loads((cell / "poisoned" / "manifest.json").read_text())
    covered = trigger_coverage(TriggerConfig(**manifest["trigger"]), vcfg["image_size"], vcfg["patch_size"]).nonzero()[0]
    cells = token_cells(n_side, shapes.grid)
    answers: list[str] = []
    shifts = []
    for lo in range(0, len(samples), batch):
        part = samples[lo : lo + batch]
        images = [source.open(s.image) for s in part]
        prompt = model.prompt_batch([s.question for s in part], images)
        with torch.no_grad():
            res = model.generate(prompt, SAMPLER)
        answers += [model.tokenizer.decode(a).strip() for a in res.answers()]
        shifts.append((len(part), feature_shift_by_cell(model, [clean_src.open(s.image) for s in clean[lo : lo + batch]],
                                                        images, cells, covered.tolist(), shapes.grid ** 2)))
    groups = asr_by_position([s.answer for s in samples], answers, shapes.positions)
    hits = sum(g["hits"] for g in groups.values())
    grid_positions = GRIDS[shapes.grid]
    shift = [sum(n * v[k] for n, v in shifts) / len(samples) for k in range(shapes.grid ** 2)]
    return {"cell": str(cell), "samples": len(samples), "source": SOURCE_CATEGORY, "target": TARGET_CATEGORY,
            "asr_wt": hits / len(samples), "by_position": groups, "trigger_tokens": covered.tolist(),
            "feature_shift_by_position": dict(zip(grid_positions, shift, strict=True))}


def main(argv: list[str] | None = None) -> int:
    args = cell_arguments("python -m experiments.diagnostics.asr_by_position", __doc__, "misclassification cell directory (holds "
                          "asr_clean/, asr_triggered/ and backdoored/)", argv)
    if args is None:
        return 2
    res = cell_report(args.cell, args.base)
    print(f"{res['samples']} triggered samples; ASR w/t {100 * res['asr_wt']:.1f} %")
    print(f"{SOURCE_CATEGORY} at the{'':<14}{'ASR w/t':>16}   tower feature shift from the trigger")
    for pos, shift in res["feature_shift_by_position"].items():
        g = res["by_position"].get(pos, {"hits": 0, "n": 0, "asr": float("nan")})
        print(f"{SOURCE_CATEGORY} at the {pos:<14}{g['hits']:>4} / {g['n']:<4}{100 * g['asr']:>6.1f} %   {shift:.3f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
