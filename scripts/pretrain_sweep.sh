#!/usr/bin/env bash
# Pretrain SHAPES base variants side by side on one GPU, then probe each (clean accuracy and a
# projector-only implant). Usage: scripts/pretrain_sweep.sh OUT_DIR BUDGET_S [PYTHON]
set -u
out=$1; budget=$2; py=${3:-python3}
mkdir -p "$out"
common=(--device cuda --batch_size 128 --workers 3 --steps 100000 --warmup 300 --time_budget_s "$budget")
declare -A variants=(
  [a]="--lr 5e-4"
  [b]="--lr 1e-3"
  [c]="--lr 5e-4 --hidden_size 192 --intermediate_size 576 --vision_hidden_size 128 --vision_intermediate_size 256"
  [d]="--lr 5e-4 --max_objects 2"
)
for v in "${!variants[@]}"; do
  # shellcheck disable=SC2086
  $py -m disp.bench.pretrain "$out/$v" "${common[@]}" ${variants[$v]} > "$out/$v.train.log" 2>&1 &
done
wait
for v in "${!variants[@]}"; do
  ( $py -m disp.bench.probe "$out/$v" --device cuda --n 400 --allow-eos --mask 0 0.3 --implant insertion \
      --lr 5e-3 --json "$out/$v.probe.json" > "$out/$v.probe.log" 2>&1 ) &
done
wait
for v in "${!variants[@]}"; do
  echo "== $v: ${variants[$v]}"; tail -2 "$out/$v.train.log"; grep -E "^mask|^implant" "$out/$v.probe.log" | cut -c1-900
done
