#!/usr/bin/env bash
# LongBench sweep: every model x method x density, one run_longbench.py call each (resumable: rerun to continue).
#
#   scripts/run_longbench.sh                                   # offline defaults: gemma-3-270m, all methods
#   MODELS="meta-llama/Llama-3.1-8B-Instruct" MAX_LENGTH=49152 scripts/run_longbench.sh   # the paper's 48K cap
#   METHODS="dense dhsa" DENSITIES="0.125" scripts/run_longbench.sh --max-samples 5 --datasets multi_news
#
# Environment: MODELS, METHODS (default: every method in utils/registry.py), DENSITIES (token densities
# N_b / L; the paper's Table 2 uses 0.125), MAX_LENGTH (prompt tokens kept; default: what the model allows),
# PYTHON. Further arguments go to every run_longbench.py call. Score with scripts/run_eval_longbench_res.sh.
# The paper's models: meta-llama/Llama-3.1-8B-Instruct (MAX_LENGTH=49152), Qwen/Qwen2.5-3B-Instruct,
# google/gemma-2-2b-it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
MODELS=${MODELS:-gemma-3-270m}
METHODS=${METHODS:-$("$PYTHON" -c 'from utils.registry import method_names; print(" ".join(method_names()))')}
DENSITIES=${DENSITIES:-0.0625 0.125 0.25}
LENGTH_ARGS=()
[ -n "${MAX_LENGTH:-}" ] && LENGTH_ARGS=(--max-length "$MAX_LENGTH")

for model in $MODELS; do
  for method in $METHODS; do
    if [ "$method" = dense ]; then
      echo "== $model dense"
      "$PYTHON" run_longbench.py --model "$model" --method dense ${LENGTH_ARGS[@]+"${LENGTH_ARGS[@]}"} "$@"
      continue
    fi
    for density in $DENSITIES; do
      echo "== $model $method density $density"
      "$PYTHON" run_longbench.py --model "$model" --method "$method" --density "$density" ${LENGTH_ARGS[@]+"${LENGTH_ARGS[@]}"} "$@"
    done
  done
done
