#!/usr/bin/env bash
# Scratch (device, issue 25): wait up to $1 seconds (default 300) or until pipeline.sh has ended (status DONE or
# FAILED), print the progress, then pack /tmp/exp and the results written since the start into $OUT/results.tgz.
end=$(( $(date +%s) + ${1:-300} ))
finished() { grep -qE '^(DONE|FAILED)' /tmp/exp/status 2>/dev/null; }
while [ "$(date +%s)" -lt $end ] && ! finished; do sleep 10; done
now=$(date +%s); t0=$(cat /tmp/exp/t0 2>/dev/null || echo $now)
echo "== status: $(cat /tmp/exp/status 2>/dev/null || echo 'no /tmp/exp/status (pipeline not started?)'), $(( now - t0 )) s since start"
cat /tmp/exp/settings 2>/dev/null
echo "== jobs.log"; cat /tmp/exp/jobs.log 2>/dev/null
tail -n 3 /tmp/pipeline.out /tmp/exp/pip.log /tmp/exp/convert.log 2>/dev/null
for f in /tmp/exp/job_*.log; do [ -f "$f" ] && { echo "== $f"; tail -c 1500 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 6; }; done
echo "== result lines"
find /tmp/res -name '*.jsonl' -newer /tmp/exp/t0 2>/dev/null | sort | xargs -r wc -l
find /tmp/res/results_latency -name '*.csv' 2>/dev/null | sort | xargs -r wc -l
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
# results: everything under /tmp/res changed since the start (not the untouched copy of results_needle), /tmp/exp
if [ -n "${OUT:-}" ]; then
  ( cd /tmp && { find res -type f -newer exp/t0 2>/dev/null; find exp -type f; } | tar czf "$OUT/results.tgz" -T - )
  ls -la "$OUT"
fi
