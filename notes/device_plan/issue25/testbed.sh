#!/usr/bin/env bash
# Scratch (device): the selection testbed of issue 27 for qwen2.5-coder-0.5b-instruct at 16K and 32K on the GPU
# (fp32, the same code as on the CPU; the 32K dense forward and its scoring take the 2-core CPU over an hour).
# /tmp/blob05 holds the carried GGUF pieces; .carry/pg the 49 essays (the default haystack, same files).
set -u
export DHSA_CACHE=/tmp/cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
MODEL_NAME=qwen2.5-coder-0.5b-instruct python3 notes/device_plan/issue25/convert.py /tmp/blob05 || exit 1
python3 run_selection_testbed.py --model qwen2.5-coder-0.5b-instruct --lengths ${LENGTHS:-16K 32K} --device cuda \
    --haystack-dir .carry/pg --output-dir /tmp/tb --methods oracle_topk dhsa "dhsa[dense_tail=0]" \
    "dhsa[dense_tail=0,exact_tail=64]" "dhsa[dense_tail=128]" "dhsa[token_rescore=1.5]" "dhsa[token_rescore=2]" \
    "dhsa[chunk_size=8]" block_sparse vertical_slash flexprefill xattention streaming 2>&1 | grep -v "it/s\]" | tail -40
cp /tmp/tb/qwen2.5-coder-0.5b-instruct/testbed.* "$OUT"/
