#!/usr/bin/env bash
# Score every LongBench run under results_longbench/ (or RESULTS_DIR) with LongBench's metrics and write
# results.md / results.csv there (results_e.* for LongBench-E runs). Arguments go to eval_longbench.py.
#
#   scripts/run_eval_longbench_res.sh
#   RESULTS_DIR=/data/results_longbench scripts/run_eval_longbench_res.sh --output-dir tables/
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PYTHON" eval_longbench.py --results-dir "${RESULTS_DIR:-results_longbench}" "$@"
