#!/bin/sh
# The cascade's held-out evaluations (research/cascade/README.md). Run from the repository root:
#   sh research/cascade/run.sh gsm8k|math
# DATA is the shared data folder. Each run waits for its scorer features to be in the cache (another process may be
# extracting them) so that no extraction runs twice.
set -e
DATA=${DATA:-/work/shared/data}
export PYTHONPATH=$PWD
wait_for() { while [ ! -f "$1" ]; do sleep 30; done; }
case "$1" in
gsm8k)
  wait_for "$2"; wait_for "$3"
  .venv/bin/python -m probes eval --config config.yaml --data "$DATA/gsm8k_train_qwen25math.jsonl" \
      --test "$DATA/gsm8k_test_qwen25math.jsonl" --train-labels qwen2.5-math-7b=Qwen/Qwen2.5-Math-1.5B-Instruct \
      --cascade --bootstrap 200 --no-progress --out research/cascade/gsm8k-train-test
  .venv/bin/python -m probes eval --config config.yaml --data "$DATA/gsm8k_train_qwen25math.jsonl" \
      --train-labels qwen2.5-math-7b=Qwen/Qwen2.5-Math-1.5B-Instruct \
      --cascade --bootstrap 200 --no-progress --out research/cascade/gsm8k-train-cv
  ;;
math)
  wait_for "$2"; wait_for "$3"
  .venv/bin/python -m probes eval --config examples/math-pool.yaml --data "$DATA/math_train_pool.jsonl" --folds 3 \
      --text-features tfidf+length --share-labels all --cascade --bootstrap 200 --no-progress \
      --out research/cascade/math-pool-cv
  ;;
esac
