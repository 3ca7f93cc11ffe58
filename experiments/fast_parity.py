"""Approximate purification against exact decoding, on the defense's own terms (issue 28).

    python -m experiments.fast_parity [--base DIR] [--work DIR] [--json OUT] [--defense NAME] [--settings NAME ...]

One cell (the quick cell's sizes, insertion behind the corner patch, `experiments.reproduce.ReproduceConfig.quick`)
is built (or reused from `--work`), its training set scored once, then for each sampler setting of the
purification (`SETTINGS`; "exact" is the paper's sampler) in one process: purification (its wall time and
model FLOPs, `experiments.benchmarks.measure.FlopCounter`), answer agreement with the exact rewrite, the
fraction of poisoned samples whose rewrite still carries the backdoor, recovery fine-tuning from the
backdoored projector, and CP / ASR w/o / ASR w/t of the recovered projector (evaluated with the cell's exact
sampler). A setting counts (`parity`) when its ASR w/t and CP are within `TOLERANCE` of exact.

The stages are those `disp.defend` runs for the defense (`--defense`: the paper's "disp" or one of the runner's
saliency variants, e.g. "disp_isolation_anchor"; `score_samples`, `purify_samples`, `finetune_samples` with the
anchor on the samples whose answer the rewrite kept), called directly so that scoring, which no sampler setting
changes, runs once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from disp.baselines import read_manifest
from disp.cell import BASE_CHECKPOINT, evaluate_cell, prepare_cell
from disp.metrics import attack_succeeded
from disp.models import load
from disp.pipeline import (
    VisionCache,
    finetune_samples,
    kept_answers,
    load_dataset,
    purify_samples,
    score_samples,
)
from disp.shapes import config_of_checkpoint
from experiments.benchmarks.measure import FlopCounter
from experiments.benchmarks.workloads import purified_samples
from experiments.environment import environment
from experiments.reproduce import VARIANTS, ReproduceConfig, defense_config

# name -> SamplerConfig overrides of the purification's sampler (and, under "finetune", FinetuneConfig overrides
# of the recovery)
BF16_CPU = {"finetune": {"bf16_cpu": True}}
SETTINGS: dict[str, dict[str, Any]] = {
    "exact": {},
    "cache4": {"prompt_cache_refresh": 4},
    "cache8": {"prompt_cache_refresh": 8},
    "threshold0.9": {"confidence_threshold": 0.9},
    "threshold0.7": {"confidence_threshold": 0.7},
    "threshold0.9+cache8": {"confidence_threshold": 0.9, "prompt_cache_refresh": 8},
    "cache16": {"prompt_cache_refresh": 16},
    "cache32": {"prompt_cache_refresh": 32},
    "threshold0.99": {"confidence_threshold": 0.99},
    "threshold0.999": {"confidence_threshold": 0.999},
    "threshold0.99+cache8": {"confidence_threshold": 0.99, "prompt_cache_refresh": 8},
    "threshold0.999+cache8": {"confidence_threshold": 0.999, "prompt_cache_refresh": 8},
    "bf16": BF16_CPU,
    "threshold0.99+cache8+bf16": {"confidence_threshold": 0.99, "prompt_cache_refresh": 8, **BF16_CPU},
    "threshold0.99+bf16": {"confidence_threshold": 0.99, **BF16_CPU},
}
TOLERANCE = 0.01  # ASR w/t and CP within 1 point of exact
TARGET, TRIGGER = "insertion", "corner"


def _answer(record: dict) -> str:
    return record["disp"]["purified_answer"]


def run(
    base: Path, work: Path, names: list[str], *, defense: str = "disp", exact: dict | None = None,
    out: Path | None = None, cfg: ReproduceConfig | None = None, log=print
) -> dict[str, Any]:
    """The cell, then every setting of `names` (exact first, unless `exact`, the exact row of an earlier run of
    the same cell, is given); returns {"config", "rows", ...}, also written to `out` after every row. `cfg`: the
    cell's settings (default: the quick cell's)."""
    cfg = cfg or ReproduceConfig.quick(base=str(base))
    shapes = config_of_checkpoint(base)
    cell = prepare_cell(work, base, TARGET, TRIGGER, cfg.poison_ratio, cfg, shapes, log=log)
    dcfg = defense_config(defense, cfg)
    device = cfg.torch_device()
    model = load(base, projector=cell.backdoored, device=device)
    samples, source = load_dataset(cell.poisoned_json, cell.poisoned_json.parent)
    poisoned = set(read_manifest(cell.manifest)["poisoned_ids"])
    cache = VisionCache()
    t = time.perf_counter()
    scores = score_samples(
        model,
        samples,
        source,
        dcfg.saliency,
        dcfg.purify.sampler,
        cache=cache,
        workers=None,
        question=dcfg.purify.question,
    )
    log(f"scored {len(samples)} samples in {time.perf_counter() - t:.0f}s")
    projector0 = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
    rows: list[dict[str, Any]] = [exact] if exact else []
    exact_answers: list[str] | None = exact["answers"] if exact else None
    result = {
        "base": str(base),
        "cell": f"{TARGET}/{TRIGGER}/p{cfg.poison_ratio:g}",
        "config": asdict(cfg),
        "defense_name": defense,
        "defense": dcfg.to_dict(),
        "tolerance": TOLERANCE,
        "threads": torch.get_num_threads(),
        "environment": environment(),
        "rows": rows,
    }
    for name in ([] if exact else ["exact"]) + [n for n in names if n != "exact"]:
        sampler = {k: v for k, v in SETTINGS[name].items() if k != "finetune"}
        ftcfg = replace(dcfg.finetune, **SETTINGS[name].get("finetune", {}))
        pcfg = replace(dcfg.purify, sampler=replace(dcfg.purify.sampler, **sampler))
        counter = FlopCounter(model)
        with counter.counting():
            t = time.perf_counter()
            records = purify_samples(model, samples, source, pcfg, scores, cache=cache, workers=None)
            seconds = time.perf_counter() - t
        answers = [_answer(r) for r in records]
        exact_answers = exact_answers or answers
        bad = [_answer(r) for r in records if r["id"] in poisoned]
        train = purified_samples(records)
        model.projector.load_state_dict(projector0)
        ft_dir = work / "fast" / defense / name
        t = time.perf_counter()
        finetune_samples(model, train, source, ftcfg, ft_dir, run_key=f"fast-{defense}-{name}",
                         anchor=kept_answers(records), cache=cache)
        ft_seconds = time.perf_counter() - t
        model.projector.load_state_dict(projector0)
        ev = evaluate_cell(base, ft_dir / "projector.safetensors", cell, TARGET, cfg)
        row = {
            "setting": name,
            "sampler": sampler,
            "finetune": SETTINGS[name].get("finetune", {}),
            "agreement": sum(a == b for a, b in zip(answers, exact_answers, strict=True)) / len(answers),
            "purified_backdoor_rate": sum(attack_succeeded(TARGET, a) for a in bad) / len(bad),
            "cp": ev["cp"],
            "asr_wo": ev["asr_wo"],
            "asr_wt": ev["asr_wt"],
            "purification_s": round(seconds, 2),
            "purification_flops": counter.take(),
            "finetune_s": round(ft_seconds, 2),
            "cp_correct": ev["cp_correct"],
            "answers": answers,
        }
        ref = rows[0] if rows else row
        row["flops_ratio"] = ref["purification_flops"] / row["purification_flops"]
        row["time_ratio"] = ref["purification_s"] / row["purification_s"]
        row["parity"] = (
            abs(row["asr_wt"] - ref["asr_wt"]) <= TOLERANCE + 1e-9
            and abs(row["cp"] - ref["cp"]) <= TOLERANCE + 1e-9
        )
        log(json.dumps({k: v for k, v in row.items() if k not in ("cp_correct", "answers")}))
        rows.append(row)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['cell']} on {Path(result['base']).name}, {result.get('defense_name', 'disp')}",
        f"  {'setting':<22}{'agree':>7}{'bd-rate':>9}{'CP':>7}{'ASR w/o':>9}{'ASR w/t':>9}"
        f"{'purify s':>10}{'FLOPs x':>9}{'time x':>8}  parity",
    ]
    for r in result["rows"]:
        lines.append(
            f"  {r['setting']:<22}{100 * r['agreement']:>6.1f}%{100 * r['purified_backdoor_rate']:>8.1f}%"
            f"{100 * r['cp']:>6.1f}%{100 * r['asr_wo']:>8.1f}%{100 * r['asr_wt']:>8.1f}%"
            f"{r['purification_s']:>10.1f}{r['flops_ratio']:>8.2f}x{r['time_ratio']:>7.2f}x  "
            f"{'yes' if r['parity'] else 'NO'}"
        )
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]]) -> str:
    """One markdown table of several runs: per (base, defense) cell its exact row then every setting, the last run
    that has a setting giving its row; CP and ASR w/t with their change against the cell's exact row."""
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for result in results:
        key = (Path(result["base"]).name, result.get("defense_name", "disp"))
        for r in result["rows"]:
            cells.setdefault(key, {})[r["setting"]] = r
    lines = ["| base | defense | setting | answers = exact | still backdoored | CP (Δ) | ASR w/t (Δ) | purification "
             "FLOPs saved | recovery s | parity (±1 pt) |", "|" + "---|" * 10]
    for (base, defense), rows in cells.items():
        exact = rows["exact"]
        for name, r in [("exact", exact), *((n, r) for n, r in rows.items() if n != "exact")]:
            d_cp, d_asr = 100 * (r["cp"] - exact["cp"]), 100 * (r["asr_wt"] - exact["asr_wt"])
            ok = abs(d_cp) <= 100 * TOLERANCE + 1e-6 and abs(d_asr) <= 100 * TOLERANCE + 1e-6
            lines.append(
                f"| {base} | {defense} | {name} | {100 * r['agreement']:.1f} % | {100 * r['purified_backdoor_rate']:.1f} % "
                f"| {100 * r['cp']:.0f} % ({d_cp:+.0f}) | {100 * r['asr_wt']:.1f} % ({d_asr:+.1f}) | "
                f"{exact['purification_flops'] / r['purification_flops']:.1f}x | {r['finetune_s']:.1f} | "
                f"{'—' if name == 'exact' else ('yes' if ok else '**no**')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base", type=Path, default=BASE_CHECKPOINT, help="base checkpoint (default: the shipped base)"
    )
    p.add_argument("--work", type=Path, help="work directory (the cell is cached there; required unless --table)")
    p.add_argument("--table", type=Path, nargs="+",
                   help="print one markdown table of these earlier --json results and exit")
    p.add_argument("--json", type=Path, help="write the rows here (after every row)")
    p.add_argument("--defense", default="disp", choices=["disp", *VARIANTS],
                   help="the defense whose purification the settings change (default: the paper's disp)")
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTINGS),
        choices=list(SETTINGS),
        help="sampler settings of the purification (exact always runs first)",
    )
    p.add_argument(
        "--exact-from",
        type=Path,
        help="take the exact row from this earlier --json of the same cell instead of re-running it",
    )
    args = p.parse_args(argv)
    if args.table:
        print(markdown([json.loads(f.read_text()) for f in args.table]))
        return 0
    if args.work is None:
        p.error("--work is required (unless --table)")
    exact = None
    if args.exact_from:
        earlier = json.loads(args.exact_from.read_text())
        if earlier["base"] != str(args.base):
            p.error(f"--exact-from {args.exact_from} is of base {earlier['base']}, not {args.base}")
        if earlier.get("defense_name", "disp") != args.defense:
            p.error(f"--exact-from {args.exact_from} is of defense {earlier.get('defense_name', 'disp')}, "
                    f"not {args.defense}")
        exact = earlier["rows"][0]
    result = run(args.base, args.work, args.settings, defense=args.defense, exact=exact, out=args.json)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
