"""How close each defense's purified training set comes to the clean one (docs/reproduction.md, "The protocol
on v3").

    python -m experiments.diagnostics.purified_check WORK [--json OUT]

WORK is a `python -m experiments.reproduce --work` directory. For every cell in it (`<target>-<trigger>-p<ratio>/`) and
every defense that left a non-empty `purified.json` (pruning trains nothing), the report counts, against the cell's clean training set
(`data-<target>/train.json`, the answers before poisoning):
- poisoned samples whose purified answer is the clean answer, word for word;
- clean samples whose purified answer is still the clean answer;
- samples the defense dropped from its set (oracle filtering drops the poisoned ones).
A defense whose purified set matches on both counts trained its recovery on exactly the data an oracle
that relabels the poisoned samples would give it. Runs on the stored files; no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CELL_DIR = re.compile(r"^(?P<target>[a-z]+)-(?P<trigger>[a-z]+)-p(?P<ratio>[0-9.]+)$")


def answer(record: dict) -> str:
    """The reference answer of a LLaVA-style record (its last "gpt" turn), stripped."""
    return [t["value"] for t in record["conversations"] if t["from"] == "gpt"][-1].strip()


def compare(clean: dict[str, str], purified: list[dict], poisoned_ids: set[str]) -> dict:
    """Counts of purified answers equal to the clean ones, split into poisoned and clean samples; samples the
    defense left out of its set (oracle filtering drops the poisoned ones) count as dropped."""
    unknown = sorted({r["id"] for r in purified} - set(clean))
    if unknown:
        raise ValueError(f"purified set holds {len(unknown)} samples not in the training set, first {unknown[0]!r}")
    out = {"poisoned": 0, "poisoned_as_clean": 0, "clean": 0, "clean_kept": 0}
    for rec in purified:
        group = "poisoned" if rec["id"] in poisoned_ids else "clean"
        out[group] += 1
        out["poisoned_as_clean" if group == "poisoned" else "clean_kept"] += answer(rec) == clean[rec["id"]]
    kept = {r["id"] for r in purified}
    out["poisoned_dropped"] = len(poisoned_ids - kept)
    out["clean_dropped"] = len(set(clean) - poisoned_ids - kept)
    return out


def cell_report(work: Path, cell: Path) -> dict:
    """Per defense of one cell directory: `compare`'s counts."""
    m = CELL_DIR.match(cell.name)
    if m is None:
        raise ValueError(f"{cell} is not a cell directory (<target>-<trigger>-p<ratio>)")
    train = work / f"data-{m['target']}" / "train.json"
    if not train.is_file():
        raise FileNotFoundError(f"{train} not found: the cell's clean training set")
    clean = {r["id"]: answer(r) for r in json.loads(train.read_text())}
    poisoned = set(json.loads((cell / "poisoned" / "manifest.json").read_text())["poisoned_ids"])
    sets = {d.name: json.loads((d / "purified.json").read_text())
            for d in sorted(cell.iterdir()) if (d / "purified.json").is_file()}
    return {name: compare(clean, records, poisoned) for name, records in sets.items() if records}  # pruning: none


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, nargs="+", help="`python -m experiments.reproduce --work` directories")
    ap.add_argument("--json", type=Path, default=None, help="write the counts here")
    args = ap.parse_args(argv)
    report: dict[str, dict] = {}
    for work in args.work:
        if not work.is_dir():
            ap.error(f"{work} is not a directory")
        for cell in sorted(p for p in work.iterdir() if p.is_dir() and CELL_DIR.match(p.name)):
            report[cell.name] = cell_report(work, cell)
    print("| cell | defense | poisoned answers now clean | clean answers kept | dropped |\n|---|---|---|---|---|")
    for cell, by in report.items():
        for d, c in by.items():
            print(f"| {cell} | {d} | {c['poisoned_as_clean']} / {c['poisoned']} | {c['clean_kept']} / {c['clean']} | "
                  f"{c['poisoned_dropped'] + c['clean_dropped']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
