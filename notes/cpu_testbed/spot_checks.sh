#!/usr/bin/env bash
# CPU spot checks of the question-tail default on the small models (issue 27): the quickstart's gemma-3-270m cells
# (2K/4K x 5 depths, 6.25%) and smollm2-135m at 2K/4K x depths 0/10 (min 512 keys), each with the new default
# (dense tail of 64 queries) and with today's (--dense-tail 0), dense once. From a snapshot of the tree.
set -u
SNAP=${SNAP:-/work/snap3}; LOG=${LOG:-/work/spot.log}; OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$(dirname "$0")/snapshot.sh"
R=$REPO/results_needle
run() { job "$*" $PY run_needle_in_haystack.py --device cpu "$@"; }
run --model gemma-3-270m --methods dense dhsa --density 0.0625 --lengths 2K 4K --depths 0 25 50 75 100 --output-dir $R/cpu_spot_checks
run --model gemma-3-270m --methods dhsa --density 0.0625 --lengths 2K 4K --depths 0 25 50 75 100 --dense-tail 0 --output-dir $R/cpu_spot_checks_no_question_tail
run --model smollm2-135m --methods dense dhsa --densities 0.0625 --min-budget 512 --lengths 2K 4K --depths 0 10 --output-dir $R/cpu_spot_checks
run --model smollm2-135m --methods dhsa --densities 0.0625 --min-budget 512 --lengths 2K 4K --depths 0 10 --dense-tail 0 --output-dir $R/cpu_spot_checks_no_question_tail
echo "$(date +%T) SPOT DONE" >> $LOG
