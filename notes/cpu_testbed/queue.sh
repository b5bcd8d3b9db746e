#!/usr/bin/env bash
# The CPU accuracy runs of issue 27, one after another (2 threads each), from a snapshot of the tree so that edits
# made while they run do not change them. Results go to the real checkout ($REPO). Log: $LOG.
# ONLY="a b" runs those jobs only, in the order below; WAIT_PID=N first waits for process N to end.
set -u
SNAP=${SNAP:-/work/snap}
LOG=${LOG:-/work/queue.log}
OMP_NUM_THREADS=2
source "$(dirname "$0")/snapshot.sh"
Q=qwen2.5-coder-0.5b-instruct
NIAH="$PY run_needle_in_haystack.py --model $Q --device cpu --densities 0.0625 --min-budget 512"
[ -n "${WAIT_PID:-}" ] && while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done  # a run of an earlier queue
while read -r name cmd; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  [ -n "${ONLY:-}" ] && ! [[ " $ONLY " == *" $name "* ]] && continue
  job "$name" bash -c "$cmd"
done <<JOBS
tb16 $PY run_selection_testbed.py --model $Q --lengths 16K --output-dir $REPO/results_recall
tb32 $PY run_selection_testbed.py --model $Q --lengths 32K --output-dir $REPO/results_recall --methods oracle_topk dhsa "dhsa[dense_tail=0]" "dhsa[dense_tail=64]"
mv64 mkdir -p $REPO/results_needle/dense_tail_64/$Q && mv $REPO/results_needle/$Q/dhsa_0.0625_min512.jsonl $REPO/results_needle/dense_tail_64/$Q/
n32_new $NIAH --methods dhsa --lengths 32K --depths 20 --output-dir $REPO/results_needle
n32_dense $NIAH --methods dense --lengths 32K --depths 20 --output-dir $REPO/results_needle
n16_new $NIAH --methods dhsa --lengths 16K --depths 10 30 50 70 --output-dir $REPO/results_needle
n16_dense $NIAH --methods dense --lengths 16K --depths 10 30 50 70 --output-dir $REPO/results_needle
n32_old $NIAH --methods dhsa --dense-tail 0 --lengths 32K --depths 20 --output-dir $REPO/results_needle/no_question_tail
tr16_dense $NIAH --methods dense --needle-set trondheim --haystack-dir $REPO/.carry/news --lengths 16K --depths 30 70 --output-dir $REPO/results_needle/trondheim_news
tr16_new $NIAH --methods dhsa --needle-set trondheim --haystack-dir $REPO/.carry/news --lengths 16K --depths 30 70 --output-dir $REPO/results_needle/trondheim_news
n16_sparse $NIAH --methods dhsa --decode sparse --lengths 16K --depths 10 30 50 70 --output-dir $REPO/results_needle
JOBS
echo "$(date +%T) QUEUE DONE" >> $LOG
