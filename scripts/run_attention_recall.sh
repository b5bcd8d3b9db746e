#!/usr/bin/env bash
# Attention recall of every sparse method vs. the number of kept keys (paper Fig. 3, Fig. 12) for each model,
# into results_recall/<model>/{recall.jsonl,recall.csv,recall.png}. A rerun skips the finished layers.
# Settings come from the environment; extra flags go to run_attention_recall.py, e.g.
#   MODELS=gemma-3-270m LENGTHS="8K" bash scripts/run_attention_recall.sh --device cuda
#   NUM_QUERIES=512 bash scripts/run_attention_recall.sh --layers 0 10 20
# Defaults: both offline models, texts of 2K and 4K tokens, the last 1024 queries of each text scored,
# 64..2048 kept keys, the sparse (global) layers. The paper's setting is the last 4K queries of a 32K text.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
MODELS="${MODELS:-gemma-3-270m smollm2-135m}"
LENGTHS="${LENGTHS:-2K 4K}"
KEPT_KEYS="${KEPT_KEYS:-64 128 256 512 1024 2048}"
NUM_QUERIES="${NUM_QUERIES:-1024}"
OUTPUT_DIR="${OUTPUT_DIR:-results_recall}"

for model in ${MODELS}; do
    echo "== ${model}: lengths ${LENGTHS}, kept keys ${KEPT_KEYS}, last ${NUM_QUERIES} queries"
    # shellcheck disable=SC2086  # word splitting of the lists is intended
    "${PYTHON}" run_attention_recall.py --model "${model}" --lengths ${LENGTHS} --kept-keys ${KEPT_KEYS} \
        --num-queries "${NUM_QUERIES}" --output-dir "${OUTPUT_DIR}" "$@"
done
