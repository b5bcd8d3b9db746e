#!/usr/bin/env bash
# The paper's latency sweep (Figures 7-10, Table 5) into results_latency/ (one CSV + plot per mode and device).
# On a CUDA machine: kernel level (Llama-3.1-8B, Qwen2.5-3B, Gemma-2-2B layer shapes, 8K-128K, densities
# 6.25/12.5/25%), end to end (random-weight models of the published configs), batch. Without CUDA: the CPU mode
# (paper Figure 9). Settings come from the environment; extra flags go to every run_latency_test.py call, e.g.
#   LENGTHS="8192 32768" bash scripts/run_latency_test.sh --repeats 3
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT_DIR="${OUT_DIR:-results_latency}"
DENSITIES="${DENSITIES:-0.0625 0.125 0.25}"
LENGTHS="${LENGTHS:-8192 16384 32768 65536 131072}"
SHAPES="${SHAPES:-llama-3.1-8b qwen2.5-3b gemma-2-2b}"
CPU_LENGTHS="${CPU_LENGTHS:-4096 8192 16384 32768}"
CPU_THREADS="${CPU_THREADS:-2}"
# every registry method with a prefill selection that runs on the CPU; oracle_topk (exact top-k, quadratic) apart
CPU_METHODS="${CPU_METHODS:-sdpa dhsa dhsa_no_robust_repr dhsa_fixed_chunks block_sparse flexprefill streaming
streaming_dilated streaming_strided vertical_slash xattention}"

# shellcheck disable=SC2086  # word splitting of the lists is intended
if "${PYTHON}" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for shape in ${SHAPES}; do
        echo "== kernel level, ${shape} layer"
        "${PYTHON}" run_latency_test.py --mode kernel --shape "${shape}" --lengths ${LENGTHS} \
            --densities ${DENSITIES} --out "${OUT_DIR}" "$@"
    done
    echo "== end to end, Llama-3.1-8B (random weights), up to 128K"
    "${PYTHON}" run_latency_test.py --mode e2e --models llama-3.1-8b-instruct --lengths 8192 32768 131072 \
        --densities 0.0625 --out "${OUT_DIR}" "$@"
    echo "== end to end, Qwen2.5-3B and Gemma-2-2B (random weights); Table 5 lengths"
    "${PYTHON}" run_latency_test.py --mode e2e --models qwen2.5-3b-instruct gemma-2-2b-it --lengths 8192 16384 32768 \
        --densities 0.0625 --out "${OUT_DIR}" "$@"
    echo "== batch (Figure 10)"
    "${PYTHON}" run_latency_test.py --mode batch --lengths 8192 16384 32768 --batch-sizes 1 2 4 8 \
        --densities 0.0625 --out "${OUT_DIR}" "$@"
else
    # issue 28, on a quiet machine: methods interleaved in one process, min of 3 runs, ${CPU_THREADS} threads
    echo "== no CUDA: one layer (Figure 9), 8x2x64 and Qwen2.5-0.5B's 14x2x64, every method at 6.25%"
    "${PYTHON}" run_latency_test.py --mode cpu --shape 8x2x64 14x2x64 --lengths ${CPU_LENGTHS} --densities 0.0625 \
        --methods ${CPU_METHODS} --threads "${CPU_THREADS}" --out "${OUT_DIR}" "$@"
    "${PYTHON}" run_latency_test.py --mode cpu --shape 8x2x64 14x2x64 --lengths 4096 8192 --densities 0.0625 \
        --methods sdpa oracle_topk --threads "${CPU_THREADS}" --out "${OUT_DIR}" "$@"
    echo "== prefill of qwen2.5-coder-0.5b-instruct (random weights), dense SDPA vs DHSA, attention's share"
    "${PYTHON}" run_latency_test.py --mode e2e --device cpu --models qwen2.5-coder-0.5b-instruct \
        --e2e-methods dense dhsa --lengths 8192 16384 --densities 0.0625 --threads "${CPU_THREADS}" \
        --out "${OUT_DIR}" "$@"
    echo "== one decode step against a 32K KV cache (14x2x64): dense SDPA vs DHSA's sparse decode"
    "${PYTHON}" run_latency_test.py --mode decode --device cpu --shape 14x2x64 --lengths 32768 --densities 0.0625 \
        --methods sdpa dhsa --threads "${CPU_THREADS}" --out "${OUT_DIR}" "$@"
fi
"${PYTHON}" run_latency_test.py --mode plot --out "${OUT_DIR}"
