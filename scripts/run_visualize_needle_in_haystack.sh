#!/usr/bin/env bash
# Draw every Needle-in-a-Haystack run: a heatmap PNG next to each results_needle/<model>/<run>.jsonl, and
# compare_<density>.png per model with the runs of one density side by side (dense in each).
#   bash scripts/run_visualize_needle_in_haystack.sh [results folder or .jsonl files]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
"${PYTHON}" visualize_needle_in_haystack.py "${@:-results_needle}"
