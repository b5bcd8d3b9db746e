#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite on the CPU (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
