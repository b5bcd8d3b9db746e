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
# LENGTHS: prompt lengths (default: 1K doubling up to the model's maximum). ROPE_SCALING: extend the context beyond
# the model's native length (YaRN, Qwen2.5 and Llama models; results go to <model>_yarn4/), e.g. 32K-128K:
#   MODELS=qwen2.5-coder-1.5b-instruct METHODS=dense DECODES=dense ROPE_SCALING=yarn:4 \
#       LENGTHS="32K 64K 96K 128K" bash scripts/run_needle_in_haystack.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
MODELS="${MODELS:-qwen2.5-coder-1.5b-instruct gemma-3-270m smollm2-135m}"
METHODS="${METHODS:-dense dhsa oracle_topk streaming streaming_dilated streaming_strided vertical_slash block_sparse flexprefill xattention}"
DECODES="${DECODES:-dense sparse}"
DENSITIES="${DENSITIES:-0.0625}"
MIN_BUDGET="${MIN_BUDGET:-512}"
OUTPUT_DIR="${OUTPUT_DIR:-results_needle}"
LENGTHS="${LENGTHS:-}"
ROPE_SCALING="${ROPE_SCALING:-}"
EXTRA=()
if [ -n "${LENGTHS}" ]; then
    # shellcheck disable=SC2206  # word splitting of the list is intended
    EXTRA+=(--lengths ${LENGTHS})
fi
if [ -n "${ROPE_SCALING}" ]; then
    EXTRA+=(--rope-scaling "${ROPE_SCALING}")
fi
source scripts/launch.sh

for model in ${MODELS}; do
    for decode in ${DECODES}; do
        echo "== ${model}: ${METHODS} at density ${DENSITIES}, ${decode} decode${ROPE_SCALING:+, rope scaling ${ROPE_SCALING}}"
        # shellcheck disable=SC2086  # word splitting of the lists is intended
        launch run_needle_in_haystack.py --model "${model}" --methods ${METHODS} --densities ${DENSITIES} \
            --min-budget "${MIN_BUDGET}" --decode "${decode}" --output-dir "${OUTPUT_DIR}" "${EXTRA[@]}" "$@"
    done
done
