#!/usr/bin/env bash
# The full `python -m experiments.reproduce` protocol split into independent parts run side by side (one GPU or
# many cores), then merged into one results JSON. Each part has its own work dir (its own implant).
# Usage: experiments/scripts/reproduce_parallel.sh OUT_DIR [extra flags for every part, e.g. --device cuda]
if [ $# -eq 0 ] || [[ $1 == -* ]]; then  # -h/--help (or flags before OUT_DIR): print the header above, run nothing
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ ${1:-} == -h || ${1:-} == --help ]]; exit $?
fi
set -u
out=$1; shift
mkdir -p "$out"
none=(--targets --triggers --trigger-targets --poison-sweep --mask-sweep)
declare -A parts=(
  [insertion-corner]="--targets insertion --triggers corner"
  [refusal-corner]="--targets refusal --triggers corner"
  [misclassification-corner]="--targets misclassification --triggers corner"
  [insertion-center]="--targets insertion --triggers center"
  [insertion-noise]="--targets insertion --triggers noise"
  [insertion-multi]="--targets insertion --triggers multi"
  [insertion-blended]="--targets insertion --triggers blended"
  [poison-a]="--poison-sweep 0.1 0.3"
  [poison-b]="--poison-sweep 0.4 0.5"
  [mask-a]="--mask-sweep 0.05 0.1 0.2"
  [mask-b]="--mask-sweep 0.3 0.5 0.7 0.9"
)
start=$(date +%s)
for p in "${!parts[@]}"; do
  # shellcheck disable=SC2086
  timeout "${PART_TIMEOUT:-0}" "${PYTHON:-python}" -m experiments.reproduce "${none[@]}" ${parts[$p]} --work "$out/work-$p" --json "$out/$p.json" "$@" \
    > "$out/$p.out" 2> "$out/$p.log" &
done
wait
python3 - "$out" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
out, wall = Path(sys.argv[1]), int(sys.argv[2])
merged = {"rows": [], "poison_ratio_sweep": [], "mask_ratio_sweep": [], "parts": {}, "wall_s": wall}
for log in sorted(out.glob("*.log")):
    part = log.stem
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
    res = out / f"{part}.json"
    merged["parts"][part] = {"finished": res.is_file(), "rows": len(rows)}
    if res.is_file():
        merged["config"] = json.loads(res.read_text())["config"]
    key = "poison_ratio_sweep" if part.startswith("poison") else "mask_ratio_sweep" if part.startswith("mask") else "rows"
    merged[key] += rows
merged["poison_ratio_sweep"] += [r for r in merged["rows"] if (r["target"], r["trigger"]) == ("insertion", "corner")
                                 and r["defense"] in ("none", "disp", "random_drop", "pruning", "oracle_filter")]
(out / "reproduce.json").write_text(json.dumps(merged, indent=2))
print(json.dumps(merged["parts"]))
for r in merged["rows"] + merged["poison_ratio_sweep"] + merged["mask_ratio_sweep"]:
    print(r["target"], r["trigger"], r["defense"], r["poison_ratio"], r.get("mask_ratio", ""),
          f"cp {r['cp']:.3f} wo {r['asr_wo']:.3f} wt {r['asr_wt']:.3f}", r.get("purified_backdoor_rate"))
PY
