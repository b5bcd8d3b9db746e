#!/usr/bin/env bash
# Scratch (device, issue 25): convert qwen2.5-coder-1.5b-instruct from the carried GGUF pieces, then the runs
# J1..J5 one after the other on GPU 0. Started once from the repo root, detached (README.md beside this file):
#   FLAGS="..." setsid nohup bash notes/device_plan/issue25/pipeline.sh > /tmp/pipeline.out 2>&1 < /dev/null &
# Env: FLAGS  DHSA options for every run (e.g. "--dense-tail 64"; empty = the committed defaults)
#      JOBS   the jobs to run, in this order (default "J1 J2 J3 J4 J5")
#      JOB_TIMEOUT  seconds one job may take (default 1500)
#      KEEP_DHSA=1  keep the committed DHSA results files instead of redoing them (default: moved to /tmp/replaced)
#      REDO_NEWS_DENSE=1  redo the committed trondheim dense run too (default: it resumes, all 24 tests done;
#                         .carry/news reproduces its prompts exactly, README.md)
# Out: /tmp/res (results_needle copy + new results, results_latency), /tmp/exp (logs, jobs.log, status).
set -u
export DHSA_CACHE=/tmp/cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FLAGS=${FLAGS:-}; JOBS=${JOBS:-J0 J1 J2 J3 J4 J5}; JOB_TIMEOUT=${JOB_TIMEOUT:-1500}
SRC=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p /tmp/exp /tmp/res /tmp/repo
date +%s > /tmp/exp/t0
echo "RUNNING setup" > /tmp/exp/status
{ echo "FLAGS=$FLAGS"; echo "JOBS=$JOBS"; echo "JOB_TIMEOUT=$JOB_TIMEOUT"; echo "KEEP_DHSA=${KEEP_DHSA:-0}"; echo "REDO_NEWS_DENSE=${REDO_NEWS_DENSE:-0}"; } > /tmp/exp/settings
fail() { echo "FAILED $*" > /tmp/exp/status; echo "$(date +%s) FAILED $*" >> /tmp/exp/jobs.log; exit 1; }

# A frozen copy of the tree (code, .whl, .carry/pg, .carry/news; not the pieces): later calls re-send the
# working tree into $SRC, and the jobs must not see it change under them.
( cd "$SRC" && tar --exclude=./.carry/gguf --exclude=./.git -cf - . ) | tar -xf - -C /tmp/repo || fail copy
cd /tmp/repo
[ "$(ls .carry/pg/*.txt | wc -l)" = 49 ] || fail "carry: .carry/pg does not hold the 49 essays"
[ "$(ls .carry/news/*.txt | wc -l)" = 60 ] || fail "carry: .carry/news does not hold the 60 multi_news contexts"

# 1. wheels (gguf, rouge-score, nltk, defusedxml) -> /tmp/site
if ! python3 -c "import gguf, rouge_score.rouge_scorer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > /tmp/exp/pip.log 2>&1 || fail pip
  python3 -c "import gguf, rouge_score.rouge_scorer" >> /tmp/exp/pip.log 2>&1 || fail "import gguf/rouge_score"
fi

# 2. /tmp/blob -> GGUF (size + sha256 of utils/models/specs.py) -> $DHSA_CACHE/models/qwen2.5-coder-1.5b-instruct
echo "RUNNING convert" > /tmp/exp/status
echo "$(date +%s) start convert" >> /tmp/exp/jobs.log
python3 notes/device_plan/issue25/convert.py /tmp/blob > /tmp/exp/convert.log 2>&1
rc=$?; echo "$(date +%s) end convert rc=$rc" >> /tmp/exp/jobs.log
[ $rc = 0 ] || fail convert
date +%s > /tmp/exp/t_converted

# 3. results: the committed results_needle, so that dense (and every other finished run) resumes; the DHSA files
#    that J1-J3 redo are moved aside (the new settings would otherwise be refused as "made with other config").
Q=qwen2.5-coder-1.5b-instruct
R=/tmp/res/results_needle
if [ ! -d $R ]; then
  cp -a results_needle /tmp/res/ || fail "copy results_needle"  # -a: old mtimes, so poll.sh packs only new files
  redo=""
  [ "${KEEP_DHSA:-0}" = 1 ] || redo="$Q/dhsa_0.0625_min512.jsonl $Q/dhsa_0.0625_min512_decode-sparse.jsonl trondheim_news/$Q/dhsa_0.0625_min512.jsonl"
  [ "${REDO_NEWS_DENSE:-0}" = 1 ] && redo="$redo trondheim_news/$Q/dense.jsonl"
  for f in $redo; do
    if [ -f $R/$f ]; then mkdir -p "$(dirname /tmp/replaced/$f)"; mv $R/$f /tmp/replaced/$f; fi
  done
fi
mkdir -p /tmp/res/results_latency

RN="python3 run_needle_in_haystack.py --model $Q --densities 0.0625 --min-budget 512 --device cuda"
LT="python3 run_latency_test.py --shape llama-3.1-8b --densities 0.0625 --out /tmp/res/results_latency"
cmd_for() {
  case $1 in
    J0) echo "timeout 300 python3 -m pytest -o addopts= -q -p no:cacheprovider tests/test_kernels.py -k cuda; timeout 120 python3 -m pytest -o addopts= -q -p no:cacheprovider tests/test_question_tail.py" ;;
    J1) echo "$RN --methods dhsa --decode dense --haystack-dir .carry/pg --output-dir $R $FLAGS" ;;
    J2) echo "$RN --methods dhsa --decode sparse --haystack-dir .carry/pg --output-dir $R $FLAGS" ;;
    J3) echo "$RN --methods dense dhsa --decode dense --needle-set trondheim --haystack-dir .carry/news --lengths 4K 8K 16K 32K --depths 0 20 40 60 80 100 --output-dir $R/trondheim_news $FLAGS" ;;
    J4) echo "$LT --mode kernel --lengths 32768 65536 131072 --methods sdpa_flash sdpa_cudnn dhsa dhsa_block dhsa_block_flex block_sparse $FLAGS" ;;
    J5) echo "$LT --mode decode --lengths 32768 131072 $FLAGS" ;;
    *) return 1 ;;
  esac
}
for name in $JOBS; do
  cmd=$(cmd_for $name) || { echo "$(date +%s) unknown job $name" >> /tmp/exp/jobs.log; continue; }
  echo "RUNNING $name" > /tmp/exp/status
  echo "$(date +%s) start $name: $cmd" >> /tmp/exp/jobs.log
  timeout -k 30 $JOB_TIMEOUT bash -c "$cmd" < /dev/null > /tmp/exp/job_$name.log 2>&1
  echo "$(date +%s) end $name rc=$?" >> /tmp/exp/jobs.log
done
date +%s > /tmp/exp/t_done
echo DONE > /tmp/exp/status
