#!/usr/bin/env bash
# LongBench sweep, then its tables and density plot (eval_longbench.py -> results_longbench/results.md, .csv, .png).
# Resumable: rerun the same command to go on; finished samples are skipped. Extra flags go to every
# run_longbench.py call (e.g. --data-dir, --max-samples, --device).
#
#   bash scripts/run_longbench.sh --data-dir DIR            # the paper's sweep on qwen2.5-coder-1.5b-instruct
#   NPROC=2 bash scripts/run_longbench.sh --data-dir DIR    # the same on two GPUs (torchrun, one process per GPU)
#   MODELS=meta-llama/Llama-3.1-8B-Instruct MAX_LENGTH=49152 bash scripts/run_longbench.sh --load-in-4bit
#   SWEEP=grid METHODS="dense dhsa" DENSITIES=0.125 bash scripts/run_longbench.sh --max-samples 5
#
# SWEEP=paper (default), the runs of the paper's Tables 2-4, in two model loads per model:
#   dense, dhsa, dhsa_no_robust_repr, dhsa_fixed_chunks (Table 4), block_sparse, streaming, streaming_dilated,
#   streaming_strided, vertical_slash, flexprefill, xattention at density 12.5% (Table 2); dhsa at 6.25% and 25%
#   (Table 3, with 12.5%).
# SWEEP=grid (the default when METHODS or DENSITIES is set): every method of METHODS (default: the registry's) at
# every density of DENSITIES (default 6.25 12.5 25%).
#
# Environment: MODELS (default qwen2.5-coder-1.5b-instruct), DECODES (decode protocols, default "dense": sparse
# prefill, dense decode; "sparse" = Algorithm 2; dense attention runs once whatever the protocol), MAX_LENGTH
# (prompt tokens kept, the middle of longer prompts cut out as LongBench does; default: the model's maximum minus
# the answer), CHINESE (1, the default: the Chinese datasets too, where the data have them; 0: English only),
# OUTPUT_DIR (results_longbench), NPROC (processes = GPUs, default 1), EVAL (1: score and tabulate at the end),
# PYTHON. Data: --data-dir DIR (LongBench's jsonl files, from its data.zip), else <cache>/data/LongBench when it
# holds them, else the Hugging Face Hub. Prompts use the chat template when the tokenizer has one, except on the
# few-shot and code datasets, as LongBench's pred.py does for chat models.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MODELS=${MODELS:-qwen2.5-coder-1.5b-instruct}
DECODES=${DECODES:-dense}
CHINESE=${CHINESE:-1}
OUTPUT_DIR=${OUTPUT_DIR:-results_longbench}
EVAL=${EVAL:-1}
SWEEP=${SWEEP:-$( [ -n "${METHODS:-}${DENSITIES:-}" ] && echo grid || echo paper )}  # METHODS/DENSITIES alone: grid
source scripts/launch.sh

# Each group: "methods|densities", one run_longbench.py call (one model load) per model and decode protocol.
case "${SWEEP}" in
    paper)
        TABLE_2_4="dense dhsa dhsa_no_robust_repr dhsa_fixed_chunks block_sparse streaming streaming_dilated"
        TABLE_2_4+=" streaming_strided vertical_slash flexprefill xattention"
        RUN_GROUPS=("${TABLE_2_4}|0.125" "dhsa|0.0625 0.25") ;;
    grid)
        METHODS=${METHODS:-$("$PYTHON" -c 'from utils.methods import method_names; print(" ".join(method_names()))')}
        RUN_GROUPS=("${METHODS}|${DENSITIES:-0.0625 0.125 0.25}") ;;
    *) echo "error: SWEEP must be paper or grid, got '${SWEEP}'" >&2; exit 2 ;;
esac
EXTRA=()
[ -n "${MAX_LENGTH:-}" ] && EXTRA+=(--max-length "${MAX_LENGTH}")
[ "${CHINESE}" = 1 ] && EXTRA+=(--chinese)

for model in ${MODELS}; do
    for decode in ${DECODES}; do
        for group in "${RUN_GROUPS[@]}"; do
            methods=${group%%|*}
            densities=${group##*|}
            echo "== ${model}, ${decode} decode: ${methods} at density ${densities}"
            # shellcheck disable=SC2086  # word splitting of the lists is intended
            launch run_longbench.py --model "${model}" --methods ${methods} --densities ${densities} \
                --decode "${decode}" --output-dir "${OUTPUT_DIR}" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
        done
    done
done

if [ "${EVAL}" = 1 ]; then
    "${PYTHON}" eval_longbench.py --results-dir "${OUTPUT_DIR}"
fi
