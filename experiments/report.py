"""Tables and figures of a `python -m experiments.reproduce` result, shaped like the paper's Tables 1 and 3 and
Figures 3 and 4.

    python -m experiments.report RESULT.json [RESULT.json ...] [--merged OUT.json] [--figures DIR]

RESULT.json is `python -m experiments.reproduce --json` output (or `experiments/scripts/reproduce_parallel.sh`'s merged
reproduce.json); several are merged into one (`merge`, written to --merged), as `experiments/scripts/reproduce_cpu.sh`
makes them.
Markdown tables go to stdout; PNGs (matplotlib, the `experiments` extra) to --figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFENSE_NAMES = {"none": "Backdoored (no defense)", "disp": "DiSP", "random_drop": "Random drop 20%",
                 "pruning": "Magnitude pruning 30%", "oracle_filter": "Oracle filter", "no_mask": "No-mask (ablation)",
                 "random_mask": "Random-mask (ablation)", "disp_occlusion": "disp_occlusion (disp's variant)",
                 "disp_isolation": "disp_isolation (disp's variant)",
                 "disp_isolation_anchor": "disp_isolation_anchor (disp's variant)"}
SWEEP_CELL = ("insertion", "corner")  # the cell both sweeps vary


def merge(results: list[dict]) -> dict:
    """One result from several `python -m experiments.reproduce` results run as parts of one protocol (same settings, each
    part its own cells and sweeps). The main table's insertion / corner rows also stand in the sweeps, at the
    default poison ratio and mask ratio, for the defenses a sweep runs and where it has no point of its own."""
    cfg = results[0].get("config", {})
    keep = ("n_train", "n_asr", "n_cp", "seed", "poison_ratio", "patch_frac", "implant", "train_tasks", "mask_ratio")
    for res in results[1:]:
        differ = [k for k in keep if res.get("config", {}).get(k) != cfg.get(k)]
        if differ:
            raise ValueError(f"results made with other settings cannot be merged: {differ}")
    rows = [r for res in results for r in res["rows"]]
    main = [r for r in rows if (r["target"], r["trigger"]) == SWEEP_CELL]
    sweeps = {}
    for key, field, defenses in (("poison_ratio_sweep", "poison_ratio", "poison_sweep_defenses"),
                                 ("mask_ratio_sweep", "mask_ratio", "mask_sweep_defenses")):
        points = [r for res in results for r in res.get(key, [])]
        swept = {d for res in results if res.get(key) for d in res["config"][defenses]}
        have = {(r["defense"], r.get(field)) for r in points}
        sweeps[key] = points + [r for r in main if r["defense"] in swept and (r["defense"], r.get(field)) not in have]
    envs: list[dict] = []
    for res in results:
        if res.get("environment") and res["environment"] not in envs:
            envs.append(res["environment"])
    return {"config": cfg, **({"environment": envs[0] if len(envs) == 1 else envs} if envs else {}), "rows": rows,
            **sweeps, "seconds": round(sum(res.get("seconds", 0) for res in results), 1)}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def main_table(rows: list[dict], trigger: str = "corner") -> str:
    """Table 1: rows = defense, column groups = target (CP, ASR w/o, ASR w/t)."""
    targets = [t for t in ("insertion", "refusal", "misclassification")
               if any(r["target"] == t and r["trigger"] == trigger for r in rows)]
    by = {(r["target"], r["defense"]): r for r in rows if r["trigger"] == trigger}
    head = "| defense | " + " | ".join(f"{t} CP | {t} ASR w/o | {t} ASR w/t" for t in targets) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(targets))]
    for d in DEFENSE_NAMES:
        cells = []
        for t in targets:
            r = by.get((t, d))
            cells += [pct(r["cp"]), pct(r["asr_wo"]), pct(r["asr_wt"])] if r else ["", "", ""]
        if any(cells):
            lines.append(f"| {DEFENSE_NAMES[d]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trigger_table(rows: list[dict], target: str = "insertion") -> str:
    """Table 3: rows = trigger, columns = CP and ASR w/t per defense."""
    triggers = [k for k in ("corner", "center", "noise", "multi", "blended")
                if any(r["target"] == target and r["trigger"] == k for r in rows)]
    by = {(r["trigger"], r["defense"]): r for r in rows if r["target"] == target}
    defenses = [d for d in DEFENSE_NAMES if any(k2 == d for _, k2 in by)]
    lines = ["| trigger | " + " | ".join(f"{d} CP | {d} ASR w/t" for d in defenses) + " |",
             "|" + "---|" * (1 + 2 * len(defenses))]
    for k in triggers:
        cells = []
        for d in defenses:
            r = by.get((k, d))
            cells += [pct(r["cp"]), pct(r["asr_wt"])] if r else ["", ""]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meets_target(row: dict, none: dict) -> bool:
    """The full target on a cell: the implant took (backdoored ASR w/t >= 90 %), the defense's ASR w/t is
    <= 2 % and its CP within 2 points of the backdoored model's."""
    return none["asr_wt"] >= 0.9 and row["asr_wt"] <= 0.02 and abs(row["cp"] - none["cp"]) <= 0.02 + 1e-9


def target_table(rows: list[dict],
                 defenses: tuple[str, ...] = ("disp", "disp_occlusion", "disp_isolation", "disp_isolation_anchor"),
                 ) -> str:
    """Per cell, the full run's targets: backdoored ASR w/t >= 90 %, and each defense's ASR w/t <= 2 % with CP
    within 2 points of the backdoored model (with the share of poisoned answers still backdoored after the
    rewrite)."""
    cells = list(dict.fromkeys((r["target"], r["trigger"]) for r in rows))
    by = {(r["target"], r["trigger"], r["defense"]): r for r in rows}
    present = [d for d in defenses if any(k[2] == d for k in by)]
    lines = ["| cell | backdoored CP / ASR w/t | implant >= 90 % | "
             + " | ".join(f"{d}: CP (Δ) / ASR w/t / rewrites still backdoored | {d} meets target" for d in present)
             + " |", "|" + "---|" * (3 + 2 * len(present))]
    for t, k in cells:
        none = by.get((t, k, "none"))
        if none is None:
            continue
        cells_out = [f"{pct(none['cp'])} / {pct(none['asr_wt'])}", "yes" if none["asr_wt"] >= 0.9 else "**no**"]
        for d in present:
            r = by.get((t, k, d))
            if r is None:
                cells_out += ["", ""]
                continue
            delta = round(100 * (r["cp"] - none["cp"]), 6)
            ok = meets_target(r, none)
            cells_out += [f"{pct(r['cp'])} ({delta:+.1f}) / {pct(r['asr_wt'])} / {pct(r.get('purified_backdoor_rate'))}",
                          "yes" if ok else "no"]
        lines.append(f"| {t} / {k} | " + " | ".join(cells_out) + " |")
    return "\n".join(lines)


def figure_poison(rows: list[dict], path: Path) -> None:
    """Figure 3: ASR w/t (and CP) against the poison ratio, one line per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for d in DEFENSE_NAMES:
        pts = sorted((r["poison_ratio"], r["asr_wt"], r["cp"]) for r in rows if r["defense"] == d)
        if pts:
            xs = [100 * p[0] for p in pts]
            axes[0].plot(xs, [100 * p[1] for p in pts], marker="o", label=DEFENSE_NAMES[d])
            axes[1].plot(xs, [100 * p[2] for p in pts], marker="o", label=DEFENSE_NAMES[d])
    for ax, name in zip(axes, ("ASR w/t (%)", "CP (%)"), strict=True):
        ax.set_xlabel("poison ratio (%)")
        ax.set_ylabel(name)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SHAPES base, insertion / corner trigger: poison-ratio sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_mask(rows: list[dict], path: Path) -> None:
    """Figure 4: DiSP's ASR w/t, CP and purified-backdoor rate against the mask ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["mask_ratio"], r) for r in rows if r["defense"] == "disp")
    xs = [p[0] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(xs, [100 * r["asr_wt"] for _, r in pts], marker="o", label="ASR w/t after DiSP")
    ax.plot(xs, [100 * r["cp"] for _, r in pts], marker="s", label="CP after DiSP")
    ax.plot(xs, [100 * (r.get("purified_backdoor_rate") or 0) for _, r in pts], marker="^",
            label="poisoned samples still backdoored after purification")
    ax.set_xlabel("mask ratio ρ")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("SHAPES base, insertion / corner: DiSP mask-ratio sweep", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, nargs="+", help="one or more results (merged)")
    ap.add_argument("--merged", type=Path, default=None, help="write the merged result here")
    ap.add_argument("--figures", type=Path, default=None, help="write figure3.png and figure4.png here")
    args = ap.parse_args(argv)
    res = merge([json.loads(p.read_text()) for p in args.result])
    if args.merged:
        args.merged.write_text(json.dumps(res, indent=2))
    rows = res["rows"]
    print("## Table 1 shape (trigger: corner)\n\n" + main_table(rows) + "\n")
    print("## Table 3 shape (target: insertion)\n\n" + trigger_table(rows) + "\n")
    print("## Per cell: the full run's targets\n\n" + target_table(rows) + "\n")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        figure_poison(res["poison_ratio_sweep"], args.figures / "figure3-poison-ratio.png")
        mask_rows = res["mask_ratio_sweep"]
        figure_mask(mask_rows, args.figures / "figure4-mask-ratio.png")
        print(f"wrote {args.figures}/figure3-poison-ratio.png and figure4-mask-ratio.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
