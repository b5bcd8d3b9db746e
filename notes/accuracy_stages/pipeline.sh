#!/usr/bin/env bash
# Scratch (device): convert, explore, choose, sweep. Started once with setsid; poll.sh collects results.
export DHSA_CACHE=/tmp/cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/../.."
mkdir -p /tmp/exp /tmp/res /tmp/locks
date +%s > /tmp/exp/t0
[ -f /tmp/cache/models/smollm2-135m/config.json ] || python3 .carry/jobs/assemble.py > /tmp/exp/assemble.log 2>&1 || { echo FAILED assemble > /tmp/exp/status; exit 1; }
date +%s > /tmp/exp/t_converted
Q=/tmp/cache/models/qwen2.5-coder-1.5b-instruct
NV="python3 .carry/jobs/niah_variants.py --variants .carry/jobs/variants.json --lengths 8192 16384 32768 --depths 0 25 50 75 100"
( CUDA_VISIBLE_DEVICES=0 $NV --model $Q --cases sf:.carry/pg trondheim:.carry/news --out /tmp/exp/explore_qwen_a.jsonl \
    --only dense sl_mean sl_max old_dense_decode dense_prefill_sparse_decode old_sparse_decode > /tmp/exp/explore_a.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 $NV --model $Q --cases sf:.carry/pg trondheim:.carry/news --out /tmp/exp/explore_qwen_b.jsonl \
    --only sl_none sl2_none none_nosl sl_none_sparse_decode > /tmp/exp/explore_b.log 2>&1
  CUDA_VISIBLE_DEVICES=1 $NV --model gemma-3-270m --cases sf:.carry/pg trondheim:.carry/news --out /tmp/exp/explore_gemma.jsonl \
    --only dense sl_mean sl_none sl2_none sl_max old_dense_decode > /tmp/exp/explore_g.log 2>&1 ) &
wait
date +%s > /tmp/exp/t_explored
python3 .carry/jobs/choose.py /tmp/exp/explore_qwen_a.jsonl /tmp/exp/explore_qwen_b.jsonl /tmp/exp/explore_gemma.jsonl \
    > /tmp/exp/chosen.env 2> /tmp/exp/choose.log
source /tmp/exp/chosen.env
RN="python3 run_needle_in_haystack.py --densities 0.0625 --min-budget 512 --output-dir /tmp/res/results_needle --haystack-dir .carry/pg $FLAGS"
cat > /tmp/exp/jobs.txt <<JOBS
q_main|$RN --model $Q --methods dense dhsa --decode dense
g_main|$RN --model gemma-3-270m --methods dense dhsa --decode dense
q_sparse|$RN --model $Q --methods dhsa --decode sparse
g_sparse|$RN --model gemma-3-270m --methods dhsa --decode sparse
s_main|$RN --model smollm2-135m --methods dense dhsa --decode dense
s_sparse|$RN --model smollm2-135m --methods dhsa --decode sparse
q_base|$RN --model $Q --methods block_sparse streaming
q_vs|$RN --model $Q --methods vertical_slash
q_needle2|$RN --model $Q --methods dense dhsa --needle-set trondheim --haystack-dir .carry/news --lengths 4K 8K 16K 32K --depths 0 20 40 60 80 100 --output-dir /tmp/res/results_needle/trondheim_news
g_fixed|$RN --model gemma-3-270m --methods dhsa_fixed_chunks
q_oracle|$RN --model $Q --methods oracle_topk
JOBS
worker() {
  while IFS='|' read -r name cmd; do
    mkdir /tmp/locks/$name 2>/dev/null || continue
    echo "$(date +%s) start $name" >> /tmp/exp/jobs.log
    CUDA_VISIBLE_DEVICES=$1 $cmd < /dev/null > /tmp/exp/job_$name.log 2>&1
    echo "$(date +%s) end $name rc=$?" >> /tmp/exp/jobs.log
  done < /tmp/exp/jobs.txt
}
worker 0 & worker 1 &
wait
echo DONE > /tmp/exp/status
