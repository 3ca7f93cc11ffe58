#!/usr/bin/env bash
# Every cell of the protocol (Table 1's three targets on the corner trigger, Table 3's five triggers on
# insertion), no sweeps, on 2 CPU cores: two queues of `python -m experiments.reproduce` parts, one core each, then one
# merged result and the per-cell target table (OUT/tables.md). Seed 1, 300 training samples, 200 + 200 ASR
# and 200 CP samples, as experiments/scripts/reproduce_cpu.sh.
# Usage: experiments/scripts/reproduce_cells.sh OUT_DIR --defenses D1 D2 ... [extra flags for every part]
# e.g.   experiments/scripts/reproduce_cells.sh OUT --base experiments/assets/shapes-base-v3 --defenses none disp_isolation disp_isolation_anchor
if [ $# -eq 0 ] || [[ $1 == -* ]]; then  # -h/--help (or flags before OUT_DIR): print the header above, run nothing
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ ${1:-} == -h || ${1:-} == --help ]]; exit $?
fi
set -u
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
common=(--device cpu --seed 1 --n-train 300 --n-asr 200 --n-cp 200 --poison-sweep --mask-sweep --trigger-targets "$@")
part() {  # part NAME WORK FLAGS...: rows are logged to OUT/NAME.log as they come, the result is OUT/NAME.json
  local name=$1 work=$2; shift 2
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$py" -m experiments.reproduce "${common[@]}" "$@" \
    --work "$out/$work" --json "$out/$name.json" > "$out/$name.out" 2> "$out/$name.log"
}
start=$(date +%s)
( part insertion-corner-center-noise wA --targets insertion --triggers corner center noise ) &
(
  part refusal-misc-corner wB --targets refusal misclassification --triggers corner
  part insertion-multi-blended wB --targets insertion --triggers multi blended
) &
wait
echo "wall $(( $(date +%s) - start ))s"
"$py" -m experiments.report "$out"/{insertion-corner-center-noise,refusal-misc-corner,insertion-multi-blended}.json \
  --merged "$out/reproduce.json" | tee "$out/tables.md"
