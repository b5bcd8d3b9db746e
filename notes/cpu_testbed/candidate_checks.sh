#!/usr/bin/env bash
# The NIAH cells and spot checks a testbed candidate must pass before it becomes the default (RULE.md rounds 3-6):
# qwen2.5-coder-0.5b-instruct (paper needle 32K d20, 16K d10/30/50/70; trondheim 16K d30/70; sparse decode 16K),
# gemma-3-270m quickstart cells, smollm2-135m 4 cells; DHSA only, with $FLAGS, into $OUT/ (dense cells are the
# committed ones under results_needle/). From a snapshot of the tree, one job after another.
#   FLAGS="--token-rescore 2 --rescore-queries 4" OUT=/work/main/results_needle/candidate bash notes/cpu_testbed/candidate_checks.sh
set -u
REPO=/work/main; SNAP=${SNAP:-/work/snap_cand}; LOG=${LOG:-/work/cand.log}; OUT=${OUT:?}; FLAGS=${FLAGS:?}
export DHSA_CACHE=$REPO/.cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$SNAP"; mkdir -p "$SNAP"
(cd $REPO && git ls-files -co --exclude-standard | grep -v '^results_' | tar cf - -T -) | tar xf - -C "$SNAP"
cd "$SNAP"; PY=$REPO/.venv/bin/python; Q=qwen2.5-coder-0.5b-instruct
NIAH="$PY run_needle_in_haystack.py --device cpu --methods dhsa $FLAGS"
job() { echo "$(date +%T) start $1" >> $LOG; shift; /usr/bin/time -f "%e s wall" "$@" >> $LOG.out 2>&1; echo "$(date +%T) end rc=$?" >> $LOG; }
job n32 $NIAH --model $Q --densities 0.0625 --min-budget 512 --lengths 32K --depths 20 --output-dir $OUT
job n16 $NIAH --model $Q --densities 0.0625 --min-budget 512 --lengths 16K --depths 10 30 50 70 --output-dir $OUT
job tr16 $NIAH --model $Q --densities 0.0625 --min-budget 512 --needle-set trondheim --haystack-dir $REPO/.carry/news --lengths 16K --depths 30 70 --output-dir $OUT/trondheim_news
job gemma $NIAH --model gemma-3-270m --density 0.0625 --lengths 2K 4K --depths 0 25 50 75 100 --output-dir $OUT/cpu_spot_checks
job smollm $NIAH --model smollm2-135m --densities 0.0625 --min-budget 512 --lengths 2K 4K --depths 0 10 --output-dir $OUT/cpu_spot_checks
job n16_sparse $NIAH --model $Q --densities 0.0625 --min-budget 512 --decode sparse --lengths 16K --depths 10 30 50 70 --output-dir $OUT
echo "$(date +%T) CANDIDATE DONE" >> $LOG
