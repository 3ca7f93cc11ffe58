#!/usr/bin/env bash
# The paper's protocol on 2 CPU cores: two queues of `python -m experiments.reproduce` parts, one core each, then one
# merged result, the tables (OUT/tables.md) and the figures (OUT/figures/). Every cell at seed 1, 300
# training samples, 200 + 200 ASR and 200 CP samples; each queue keeps one work dir per target, so a cell's
# implant is built once and the sweeps reuse the insertion / corner one.
# Usage: [VARIANTS="disp_occlusion disp_isolation"] experiments/scripts/reproduce_cpu.sh OUT_DIR [extra flags for every part]
# disp's variants run on the Table 1 (corner) cells, disp_occlusion by default; VARIANTS names the variants
# instead and runs them on every cell.
if [ $# -eq 0 ] || [[ $1 == -* ]]; then  # -h/--help (or flags before OUT_DIR): print the header above, run nothing
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ ${1:-} == -h || ${1:-} == --help ]]; exit $?
fi
set -u
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
common=(--device cpu --seed 1 --n-train 300 --n-asr 200 --n-cp 200 --poison-sweep --mask-sweep --trigger-targets "$@")
paper=(none disp random_drop pruning oracle_filter no_mask random_mask)
corner_variants=(${VARIANTS-disp_occlusion})
other_variants=(${VARIANTS-})
part() {  # part NAME WORK FLAGS...: rows are logged to OUT/NAME.log as they come, the result is OUT/NAME.json
  local name=$1 work=$2; shift 2
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$py" -m experiments.reproduce "${common[@]}" "$@" \
    --work "$out/$work" --json "$out/$name.json" > "$out/$name.out" 2> "$out/$name.log"
}
start=$(date +%s)
(
  part insertion-corner wA --targets insertion --triggers corner --defenses "${paper[@]}" "${corner_variants[@]}"
  part mask-sweep wA --targets --mask-sweep 0.1 0.5 0.7 0.9 --mask-sweep-defenses disp
  part poison-sweep wA --targets --poison-sweep 0.1 0.3 0.5 --poison-sweep-defenses none disp
  part insertion-center-noise wA --targets insertion --triggers center noise --defenses "${paper[@]}" "${other_variants[@]}"
) &
(
  part refusal-misc-corner wB --targets refusal misclassification --triggers corner --defenses "${paper[@]}" "${corner_variants[@]}"
  part insertion-multi-blended wB2 --targets insertion --triggers multi blended --defenses "${paper[@]}" "${other_variants[@]}"
) &
wait
echo "wall $(( $(date +%s) - start ))s"
"$py" -m experiments.report "$out"/{insertion-corner,mask-sweep,poison-sweep,insertion-center-noise,refusal-misc-corner,insertion-multi-blended}.json \
  --merged "$out/reproduce.json" --figures "$out/figures" | tee "$out/tables.md"
