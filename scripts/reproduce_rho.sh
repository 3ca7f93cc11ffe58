#!/usr/bin/env bash
# The main-table cells again with DiSP at small mask ratios (rho 0.05 and 0.1: 1 and 3 of the SHAPES base's
# 36 visual tokens), the refusal target at a lower implant lr, and candidate --quick settings; parts run side
# by side, one work dir each. Usage: scripts/reproduce_rho.sh OUT_DIR [extra flags, e.g. --device cuda]
set -u
out=$1; shift
mkdir -p "$out"
run() {  # run NAME FLAGS...: one reproduce invocation, rows logged to OUT/NAME.log
  local name=$1; shift
  timeout "${PART_TIMEOUT:-0}" ${DISP:-disp} bench reproduce --trigger-targets --poison-sweep --mask-sweep \
    "$@" --json "$out/$name.json" > "$out/$name.out" 2> "$out/$name.log"
}
cells=("insertion corner" "refusal corner" "misclassification corner" "insertion center" "insertion noise"
       "insertion multi" "insertion blended")
start=$(date +%s)
for cell in "${cells[@]}"; do
  set -- $cell "$@"
  t=$1; k=$2; shift 2
  ( run "$t-$k-rho0.05" --targets "$t" --triggers "$k" --defenses none disp --mask-ratio 0.05 --work "$out/work-$t-$k" "$@"
    run "$t-$k-rho0.1" --targets "$t" --triggers "$k" --defenses disp --mask-ratio 0.1 --work "$out/work-$t-$k" "$@" ) &
done
run refusal-lr1e-3 --targets refusal --triggers corner --defenses none disp --mask-ratio 0.05 --implant-lr 1e-3 \
  --work "$out/work-refusal-lr1e-3" "$@" &
run quick-300 --quick --mask-ratio 0.05 --work "$out/work-q300" "$@" &
run quick-500 --quick --mask-ratio 0.05 --n-train 500 --work "$out/work-q500" "$@" &
run quick-300-e30 --quick --mask-ratio 0.05 --implant-epochs 30 --work "$out/work-q300e30" "$@" &
wait
echo "wall $(( $(date +%s) - start ))s"
for f in "$out"/*.log; do
  echo "== $(basename "$f" .log)"
  grep '^{' "$f" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['defense'], r.get('mask_ratio', ''), f\"cp {r['cp']:.3f} wo {r['asr_wo']:.3f} wt {r['asr_wt']:.3f}\",
          r.get('purified_backdoor_rate'), '|', (r['examples'].get('asr_triggered') or [{}])[0])"
done
