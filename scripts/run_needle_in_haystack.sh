#!/usr/bin/env bash
# Needle-in-a-Haystack sweep: every model x method x density into results_needle/<model>/<run>.jsonl.
# One python call per model (the model loads once); finished (length, depth) pairs are skipped on a rerun.
# Settings come from the environment; extra flags go to run_needle_in_haystack.py, e.g.
#   MODELS=gemma-3-270m METHODS="dense dhsa" bash scripts/run_needle_in_haystack.sh --lengths 1K 2K 4K
# Defaults follow the paper (App. D): density 6.25%, 512 keys at least (the paper keeps 512 keys at 1K),
# lengths from 1K doubling up to the model's maximum, depths 0..100% in steps of 10%. The full sweep wants CUDA.
# DECODES: the decode protocols to run (dense = sparse prefill + dense decode, the default; sparse = Algorithm 2);
# dense attention runs once whatever the protocol.
# NPROC: processes, one per GPU (default 1); NPROC > 1 launches torchrun, the GPUs sharing each model's tests:
#   NPROC=2 bash scripts/run_needle_in_haystack.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
MODELS="${MODELS:-qwen2.5-coder-1.5b-instruct gemma-3-270m smollm2-135m}"
METHODS="${METHODS:-dense dhsa oracle_topk streaming streaming_dilated streaming_strided vertical_slash block_sparse flexprefill xattention}"
DECODES="${DECODES:-dense sparse}"
DENSITIES="${DENSITIES:-0.0625}"
MIN_BUDGET="${MIN_BUDGET:-512}"
OUTPUT_DIR="${OUTPUT_DIR:-results_needle}"
source scripts/launch.sh

for model in ${MODELS}; do
    for decode in ${DECODES}; do
        echo "== ${model}: ${METHODS} at density ${DENSITIES}, ${decode} decode"
        # shellcheck disable=SC2086  # word splitting of the lists is intended
        launch run_needle_in_haystack.py --model "${model}" --methods ${METHODS} --densities ${DENSITIES} \
            --min-budget "${MIN_BUDGET}" --decode "${decode}" --output-dir "${OUTPUT_DIR}" "$@"
    done
done
