"""Saliency methods on a reproduction cell: where each ranks the trigger, and what it costs (docs/saliency.md).

    python -m experiments.saliency_study rank CELL [--base DIR] [--n 40] [--json OUT]
    python -m experiments.saliency_study table RUN.json [RUN.json ...]

`rank` scores the first n poisoned training samples of CELL (`<work>/<target>-<trigger>-p<ratio>/` as
`python -m experiments.reproduce` leaves it) under the backdoored projector with the paper's Fisher form (M = 6),
isolation and split_isolation, and reports per method: the median rank of the best trigger token, how often all
of the trigger's main tokens are in the top floor(0.3·N_v) (`experiments.diagnostics.trigger_rank`'s measures),
the sequence copies run per sample (counted at the model's forward) and the language-model FLOPs per sample
(`measure.FlopCounter`), with the FLOP model's figures at 729 and 3,699 visual tokens
(`experiments.benchmarks.saliency_cost`).

`rows` rebuilds a reproduction JSON from the rows a run logged (one JSON object per line on stderr), for a run
stopped before it wrote its `--json`:

    python -m experiments.saliency_study rows LOG --base DIR --seed 1 --json OUT

`grid` puts reproduction JSONs of several bases, cells and seeds side by side: per cell the backdoored model and,
per defense, CP (change), ASR w/o, ASR w/t, the still-backdoored rate and whether the full target is met (implant
ASR w/t >= 90 %; defense ASR w/t <= 2 %, CP within 2 points), then per defense the implanted cells it meets:

    python -m experiments.saliency_study grid RUN.json [RUN.json ...] [--defenses D ...]

`table` joins the reproduction JSON (`--json` of `experiments.reproduce`) and the `rank` JSON of each cell
(RUN.json and RUN.json with `-rank` before `.json`) into one markdown table: CP, ASR w/o, ASR w/t, the
purified-still-backdoored rate, the trigger's rank and the forwards per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from disp.attacks import TriggerConfig
from disp.config import SaliencyConfig
from disp.models import load
from disp.models.llada_v import vision_config_from
from disp.pipeline import load_dataset
from disp.saliency import visual_saliency
from experiments.benchmarks.measure import FlopCounter
from experiments.benchmarks.saliency_cost import LMShape, scoring_flops
from experiments.diagnostics.trigger_rank import SAMPLER, trigger_coverage
from experiments.report import meets_target

METHODS = {
    "fisher": SaliencyConfig(method="fisher"),
    "isolation": SaliencyConfig(method="isolation"),
    "split_isolation": SaliencyConfig(method="split_isolation"),
}
DEFENSE_METHOD = {
    "disp": "fisher",
    "disp_isolation": "isolation",
    "disp_isolation_anchor": "isolation",
    "disp_split": "split_isolation",
    "disp_split_anchor": "split_isolation",
}


def split_variant(spec: str) -> tuple[str, SaliencyConfig]:
    """'GROUPS:BEAM:BUDGET' → a named split_isolation config."""
    try:
        groups, beam, budget = (int(x) for x in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split wants GROUPS:BEAM:BUDGET, got {spec!r}") from None
    cfg = SaliencyConfig(method="split_isolation", split_groups=groups, split_beam=beam, split_budget=budget)
    return f"split_isolation {spec}", cfg


def rank_cell(
    cell: Path, base: Path, n: int = 40, batch: int = 8, extra: dict[str, SaliencyConfig] | None = None
) -> dict:
    """Per method (METHODS and `extra`): trigger ranks (as trigger_rank) and the forwards and FLOPs per sample."""
    methods = {**METHODS, **(extra or {})}
    from disp.models.llada_lm import LLaDAConfig

    manifest = json.loads((cell / "poisoned" / "manifest.json").read_text())
    model = load(base, projector=cell / "backdoored" / "projector.safetensors")
    vcfg = vision_config_from(model.config)
    coverage = trigger_coverage(TriggerConfig(**manifest["trigger"]), vcfg["image_size"], vcfg["patch_size"])
    touched = np.flatnonzero(coverage > 0)
    main = np.flatnonzero(coverage >= min(0.5, coverage.max()))
    samples, source = load_dataset(cell / "poisoned" / "data.json", cell / "poisoned")
    chosen = [s for s in samples if s.id in set(manifest["poisoned_ids"])][:n]
    counter = FlopCounter(model)
    ranks: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    copies, flops = dict.fromkeys(methods, 0), dict.fromkeys(methods, 0.0)
    text = []
    for lo in range(0, len(chosen), batch):
        part = chosen[lo : lo + batch]
        prompt = model.prompt_batch([s.question for s in part], [source.open(s.image) for s in part])
        text += [
            int(m) - c for m, c in zip(prompt.attention_mask.sum(1), prompt.visual_counts(), strict=True)
        ]
        for name, cfg in methods.items():
            counter.backwards_per_grad_forward = cfg.probes
            seen = [0]
            with counter.counting():
                inner = model.forward_embeds

                def forward_embeds(embeds, *args, _inner=inner, _seen=seen, **kw):
                    _seen[0] += embeds.shape[0]
                    return _inner(embeds, *args, **kw)

                model.forward_embeds = forward_embeds
                try:
                    scores = visual_saliency(model, prompt, cfg, SAMPLER)
                finally:
                    model.forward_embeds = inner
            copies[name] += seen[0]
            flops[name] += counter.take()
            ranks[name] += [np.argsort(row) for row in scores.argsort(dim=1, descending=True).numpy()]
    n_v = len(coverage)
    shape = LMShape.of(LLaDAConfig())
    out = {
        "cell": str(cell),
        "base": str(base),
        "samples": len(chosen),
        "trigger": manifest["trigger"],
        "target": manifest["target"],
        "seed": manifest["seed"],
        "trigger_tokens": touched.tolist(),
        "main_trigger_tokens": main.tolist(),
        "n_visual": n_v,
        "text_tokens_median": statistics.median(text),
        "methods": {},
    }
    for name, rs in ranks.items():
        best = np.array([r[touched].min() for r in rs])
        worst_main = np.array([r[main].max() for r in rs])
        cfg = methods[name]
        out["methods"][name] = {
            "median_best_rank": float(np.median(best)),
            "trigger_first": float(np.mean(best == 0)),
            "main_in_top_rho0.3": float(np.mean(worst_main < int(0.3 * n_v))),
            "forwards_per_sample": copies[name] / len(chosen),
            "backwards_per_sample": cfg.probes if cfg.method == "fisher" else 0,
            "flops_per_sample": flops[name] / len(chosen),
            "llada_v_8b_tflops": {
                str(v): scoring_flops(shape, cfg.method, v, 100, 32, cfg) / 1e12 for v in (729, 3699)
            },
        }
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(
    runs: list[Path],
    rank_file: Path | None = None,
    split_key: str = "split_isolation",
    suffix: str = "",
    header: bool = True,
) -> str:
    """The markdown table of the reproduction rows joined with each cell's `rank` report (`rank_file`, or the
    run's own `-rank.json`); split_isolation rows take the rank entry `split_key`, their defense name `suffix`."""
    lines = [
        "| cell | defense | CP | ASR w/o | ASR w/t | still backdoored | trigger rank (median; main in top 30%) "
        "| forwards/sample |",
        "|---|---|---|---|---|---|---|---|",
    ][: 2 if header else 0]
    for run in runs:
        result = json.loads(run.read_text())
        rank_path = rank_file or run.with_name(run.stem + "-rank.json")
        rank = json.loads(rank_path.read_text())["methods"] if rank_path.is_file() else {}
        base = Path(result["base"]).name
        for r in result["rows"]:
            method = DEFENSE_METHOD.get(r["defense"], "")
            m = rank.get(split_key if method == "split_isolation" else method, {})
            name = r["defense"] + (suffix if method == "split_isolation" else "")
            rank_s = f"{m['median_best_rank']:g}; {_pct(m['main_in_top_rho0.3'])}" if m else "-"
            passes = (
                (
                    f"{m['forwards_per_sample']:g}F"
                    + (f"+{m['backwards_per_sample']}B" if m["backwards_per_sample"] else "")
                )
                if m
                else "-"
            )
            lines.append(
                f"| {base} {r['target']}/{r['trigger']} seed {result['config']['seed']} | {name} | "
                f"{_pct(r['cp'])} | {_pct(r['asr_wo'])} | {_pct(r['asr_wt'])} | "
                f"{_pct(r.get('purified_backdoor_rate'))} | {rank_s} | {passes} |"
            )
    return "\n".join(lines)


GRID_DEFENSES = ("disp", "disp_isolation_anchor", "disp_split_anchor", "disp_split")


def _rank_column(report: dict | None) -> str:
    """'fisher / isolation / split_isolation' median best trigger rank of a `rank` report, '' without one."""
    if report is None:
        return ""
    if len(report["trigger_tokens"]) == report["n_visual"]:
        return "every token"  # a blended trigger: any token is the trigger's, so its best rank is 0 by construction
    m = report["methods"]
    return " / ".join(f"{m[k]['median_best_rank']:g}" if k in m else "-" for k in METHODS)


def grid(runs: list[Path], defenses: tuple[str, ...] = GRID_DEFENSES, ranks: tuple[Path, ...] = ()) -> str:
    """Markdown: one line per (base, target, trigger, seed) of `runs`, then the tally per defense. A cell seen in
    several runs keeps the row of the last run that has it, defense by defense; a run given as RUN.json::D1,D2
    gives only those defenses' rows. `ranks` (`rank` reports) add the median trigger rank of each saliency
    method on the cells they scored."""
    by_cell = {}
    for path in ranks:
        report = json.loads(path.read_text())
        by_cell[Path(report["base"]).name, report["target"], report["trigger"]["kind"], report["seed"]] = report
    cells: dict[tuple, dict[str, dict]] = {}
    for run in runs:
        path, _, only = str(run).partition("::")  # RUN.json::none,disp: only those defenses' rows of RUN.json
        keep = set(only.split(",")) if only else None
        result = json.loads(Path(path).read_text())
        base, seed = Path(result["base"]).name, result["config"]["seed"]
        for r in result["rows"]:
            if keep is not None and r["defense"] not in keep:
                continue
            key = (base, r["target"], r["trigger"], seed)
            cells.setdefault(key, {})[r["defense"]] = r
    present = [d for d in defenses if any(d in c for c in cells.values())]
    head = ["base", "cell", "seed", "backdoored CP / ASR w/t"]
    head += ["trigger rank (fisher / isolation / split)"] * bool(ranks)
    head += [c for d in present for c in (f"{d}: CP (Δ) / ASR w/o / ASR w/t / still bd", "ok")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    met = dict.fromkeys(present, 0)
    tried = dict.fromkeys(present, 0)
    implanted = 0
    for (base, target, trigger, seed), by in sorted(cells.items()):
        none = by.get("none")
        if none is None:
            continue
        took = none["asr_wt"] >= 0.9
        implanted += took
        out = [f"{_pct(none['cp'])} / {_pct(none['asr_wt'])}" + ("" if took else " (implant < 90 %)")]
        if ranks:
            out.append(_rank_column(by_cell.get((base, target, trigger, seed))))
        for d in present:
            r = by.get(d)
            if r is None:
                out += ["", ""]
                continue
            ok = meets_target(r, none)
            if took:
                tried[d] += 1
                met[d] += ok
            out += [f"{_pct(r['cp'])} ({100 * (r['cp'] - none['cp']):+.0f}) / {_pct(r['asr_wo'])} / {_pct(r['asr_wt'])} / "
                    f"{_pct(r.get('purified_backdoor_rate'))}", ("yes" if ok else "**no**") if took else "-"]
        lines.append(f"| {base} | {target}/{trigger} | {seed} | " + " | ".join(out) + " |")
    lines.append("")
    lines.append(f"Implanted cells (backdoored ASR w/t >= 90 %): {implanted}. Full target met: "
                 + "; ".join(f"{d} {met[d]} of {tried[d]}" for d in present) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.saliency_study", description=__doc__.split("\n\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rank", help="trigger ranks and cost per method on one cell")
    r.add_argument("cell", type=Path)
    r.add_argument(
        "--base", type=Path, default=None, help="base checkpoint (default: the shipped SHAPES base)"
    )
    r.add_argument("--n", type=int, default=40, help="poisoned training samples scored")
    r.add_argument("--json", type=Path)
    r.add_argument(
        "--split",
        type=split_variant,
        nargs="*",
        default=[],
        help="further split_isolation settings to rank, each GROUPS:BEAM:BUDGET",
    )
    t = sub.add_parser("table", help="markdown table of reproduction runs and their rank reports")
    t.add_argument("runs", type=Path, nargs="+")
    t.add_argument("--rank", type=Path, help="rank report of every run (default: each run's own -rank.json)")
    t.add_argument("--split-key", default="split_isolation", help="rank entry of the split_isolation rows")
    t.add_argument("--suffix", default="", help="appended to the split_isolation rows' defense name")
    t.add_argument("--no-header", action="store_true")
    g = sub.add_parser("grid", help="cells x defenses of several reproduction runs, with the full target's tally")
    g.add_argument("runs", type=Path, nargs="+", help="reproduction JSONs; RUN.json::D1,D2 takes only those defenses")
    g.add_argument("--defenses", nargs="+", default=list(GRID_DEFENSES))
    g.add_argument("--rank", nargs="+", type=Path, default=[], help="rank reports: a trigger-rank column")
    w = sub.add_parser("rows", help="a reproduction JSON from the rows a stopped run logged")
    w.add_argument("log", type=Path)
    w.add_argument("--base", required=True, help="the run's base checkpoint")
    w.add_argument("--seed", type=int, required=True, help="the run's seed")
    w.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "rows":
        rows = [
            json.loads(line) for line in args.log.read_text().splitlines() if line.startswith('{"target"')
        ]
        args.json.write_text(
            json.dumps(
                {
                    "base": args.base,
                    "config": {"seed": args.seed},
                    "rows": rows,
                    "note": f"rows logged by a run stopped before its --json ({args.log.name})",
                },
                indent=2,
            )
        )
        print(f"{len(rows)} rows")
        return 0
    if args.cmd == "grid":
        print(grid(args.runs, tuple(args.defenses), tuple(args.rank)))
        return 0
    if args.cmd == "table":
        print(table(args.runs, args.rank, args.split_key, args.suffix, not args.no_header))
        return 0
    if not (args.cell / "backdoored" / "projector.safetensors").is_file():
        print(f"error: {args.cell} holds no backdoored/projector.safetensors", file=sys.stderr)
        return 2
    from disp.cell import BASE_CHECKPOINT

    res = rank_cell(args.cell, args.base or BASE_CHECKPOINT, args.n, extra=dict(args.split))
    for name, m in res["methods"].items():
        print(
            f"{name:<16} median rank {m['median_best_rank']:>5.1f}  main in top 30% {m['main_in_top_rho0.3']:.2f}  "
            f"forwards/sample {m['forwards_per_sample']:.1f}  GFLOPs/sample {m['flops_per_sample'] / 1e9:.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
