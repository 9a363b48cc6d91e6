#!/bin/sh
# The replays of research/learning/README.md, in order; each writes research/learning/<scenario>/report.json and
# replay.png (the learner's state, ignored by git, beside them). Run from the repository root:
#   OPENBLAS_NUM_THREADS=1 sh research/learning/run_scenarios.sh [a|a-cost|b|c|d]...
# DATA is the shared data folder (README: /work/shared/data); PROBES where (b) and (d) train their own probes.
set -eu
DATA=${DATA:-/work/shared/data}
PROBES=${PROBES:-/tmp/probe-router-learning-probes}
OUT=research/learning
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD}

[ $# -eq 0 ] && set -- a a-cost b c d
for scenario in "$@"; do
  case $scenario in
  a)  # the shipped GSM8K probes served on MATH: 5,000 questions, the other 2,500 held out
    $PY -m probes replay --config config.yaml --data "$DATA/math_train_pool.jsonl" --limit 5000 \
      --feedback-rate 0.5 --window 500 --explore 0.03 --seed 0 --out $OUT/a-gsm8k-probes-on-math --no-progress ;;
  a-cost)  # the same stream, both arms holding the static arm's cost of (a): accuracy at the same cost
    COST=$($PY -c "import json; print(json.load(open('$OUT/a-gsm8k-probes-on-math/report.json'))['static']['total']['cost_per_1k'])")
    $PY -m probes replay --config config.yaml --data "$DATA/math_train_pool.jsonl" --limit 5000 \
      --feedback-rate 0.5 --window 500 --explore 0.03 --seed 0 --target "cost_per_1k=$COST" \
      --out $OUT/a-gsm8k-probes-on-math-cost-target --no-progress ;;
  b)  # probes trained on GSM8K train (the shipped recipe) served on GSM8K test: 1,000 streamed, 319 held out
    $PY -m probes train --config config.yaml --data "$DATA/gsm8k_train_qwen25math.jsonl" \
      --train-labels qwen2.5-math-7b=Qwen/Qwen2.5-Math-1.5B-Instruct --out "$PROBES/gsm8k-train" --no-progress
    $PY -m probes replay --config config.yaml --probes "$PROBES/gsm8k-train" \
      --data "$DATA/gsm8k_test_qwen25math.jsonl" --limit 1000 --feedback-rate 1.0 --window 250 --after-ratings 500 \
      --explore 0.03 --seed 0 --out $OUT/b-gsm8k-train-probes-on-test --no-progress ;;
  c)  # GSM8K (train split: the shipped probes were trained on the test split) then MATH, a dear-share target
    $PY -m probes replay --config config.yaml --data "$DATA/gsm8k_train_qwen25math.jsonl" --limit 2500 \
      --then "$DATA/math_train_pool.jsonl" --then-limit 2500 --target dear_share=0.5 --feedback-rate 0.5 \
      --window 500 --explore 0.03 --seed 0 --out $OUT/c-gsm8k-then-math-dear-share --no-progress ;;
  d)  # the MATH pool's four backends, utility policy: probes trained on three subjects, streamed on the other four
    $PY -m probes train --config $OUT/math-pool-block15-last.yaml --data "$DATA/math_train_pool.jsonl" \
      --where "subject=Algebra,Prealgebra,Number Theory" --text-features tfidf+length --share-labels all \
      --folds 3 --out "$PROBES/math-easy-subjects" --no-progress
    $PY -m probes replay --config $OUT/math-pool-block15-last.yaml --probes "$PROBES/math-easy-subjects" \
      --data "$DATA/math_train_pool.jsonl" \
      --where "subject=Geometry,Intermediate Algebra,Counting & Probability,Precalculus" --limit 3000 \
      --feedback-rate 0.5 --window 500 --explore 0.03 --seed 0 --out $OUT/d-math-pool-subject-shift --no-progress ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
done
