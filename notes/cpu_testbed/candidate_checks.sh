#!/usr/bin/env bash
# The NIAH cells and spot checks a testbed candidate must pass before it becomes the default (RULE.md rounds 3-6):
# qwen2.5-coder-0.5b-instruct (paper needle 32K d20, 16K d10/30/50/70; trondheim 16K d30/70; sparse decode 16K),
# gemma-3-270m quickstart cells, smollm2-135m 4 cells; DHSA only, with $FLAGS, into $OUT/ (dense cells are the
# committed ones under results_needle/). From a snapshot of the tree, one job after another.
#   FLAGS="--token-rescore 2 --rescore-queries 4" OUT=/work/main/results_needle/candidate bash notes/cpu_testbed/candidate_checks.sh
set -u
SNAP=${SNAP:-/work/snap_cand}; LOG=${LOG:-/work/cand.log}; OUT=${OUT:?}; FLAGS=${FLAGS:?}
source "$(dirname "$0")/snapshot.sh"
Q=qwen2.5-coder-0.5b-instruct
NIAH="$PY run_needle_in_haystack.py --device cpu --methods dhsa $FLAGS"
job n32 $NIAH --model $Q --densities 0.0625 --min-budget 512 --lengths 32K --depths 20 --output-dir $OUT
job n16 $NIAH --model $Q --densities 0.0625 --min-budget 512 --lengths 16K --depths 10 30 50 70 --output-dir $OUT
job tr16 $NIAH --model $Q --densities 0.0625 --min-budget 512 --needle-set trondheim --haystack-dir $REPO/.carry/news --lengths 16K --depths 30 70 --output-dir $OUT/trondheim_news
job gemma $NIAH --model gemma-3-270m --density 0.0625 --lengths 2K 4K --depths 0 25 50 75 100 --output-dir $OUT/cpu_spot_checks
job smollm $NIAH --model smollm2-135m --densities 0.0625 --min-budget 512 --lengths 2K 4K --depths 0 10 --output-dir $OUT/cpu_spot_checks
job n16_sparse $NIAH --model $Q --densities 0.0625 --min-budget 512 --decode sparse --lengths 16K --depths 10 30 50 70 --output-dir $OUT
echo "$(date +%T) CANDIDATE DONE" >> $LOG
