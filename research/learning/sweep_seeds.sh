#!/bin/sh
# Scenario (a) replayed over several seeds (each seed shuffles MATH train anew: another 5,000 streamed, another
# 2,500 held out, other exploration and rating draws), for one learner setting. Run from the repository root:
#   sh research/learning/sweep_seeds.sh OUTDIR VARIANT FIT_WEIGHTS_JSON "EXTRA REPLAY ARGS" SEED...
# e.g. sh research/learning/sweep_seeds.sh /tmp/rx both '["propensity","none"]' "" 1 2 3 4
# writes OUTDIR/VARIANT-sSEED/report.json; python -m research.learning.compare_seeds OUTDIR/* tabulates them.
set -eu
DATA=${DATA:-/work/shared/data}
PY=${PY:-.venv/bin/python}
export OPENBLAS_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
out=$1; variant=$2; weights=$3; extra=$4; shift 4
for seed in "$@"; do
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  ROUTER_LEARNING__FIT_WEIGHTS="$weights" $PY -m probes replay --config config.yaml \
    --data "$DATA/math_train_pool.jsonl" --limit 5000 --feedback-rate 0.5 --window 500 --explore 0.03 \
    --seed "$seed" --no-progress $extra --out "$out/$variant-s$seed" > "$out/$variant-s$seed.log" 2>&1
done
