#!/usr/bin/env bash
# The SHAPES base v3 (committed in experiments/assets/shapes-base-v3/): v2's recipe with position labels in the
# vision stage, then three continuations that weight the look-up questions up (docs/reproduction.md,
# "A base that answers every look-up"). Each stage writes its own checkpoint under OUT; OUT/d is the base.
# 2 CPU cores: about 36 + 15 + 19 + 19 min. Extra flags (e.g. --device cuda, --threads 2) go to every stage.
# Usage: experiments/scripts/pretrain_v3.sh OUT_DIR [extra flags for every stage]
if [ $# -eq 0 ] || [[ $1 == -* ]]; then  # -h/--help (or flags before OUT_DIR): print the header above, run nothing
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  [[ ${1:-} == -h || ${1:-} == --help ]]; exit $?
fi
set -eu
out=$1; shift
py=${PYTHON:-.venv/bin/python}
stage() { local name=$1; shift; "$py" -m experiments.pretrain.recipe "$out/$name" "$@" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
cont=(--warmup 50 --lr 2e-4)  # every continuation
stage a --vision_position_labels true "$@"
stage b --init_from "$out/a" --steps 1500 "${cont[@]}" --tasks describe describe objects colour colour where where \
  where at which which count exists exists exists "$@"
stage c --init_from "$out/b" --steps 2000 "${cont[@]}" --tasks describe describe objects colour colour colour where \
  where where at which count exists exists exists "$@"
stage d --init_from "$out/c" --steps 2000 "${cont[@]}" --tasks describe objects colour where where where where at \
  which count exists exists exists exists "$@"
echo "wrote $out/d"
