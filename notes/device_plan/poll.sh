#!/usr/bin/env bash
# Scratch (device): wait up to $1 s (or until the pipeline is done), then pack results into $OUT.
end=$(( $(date +%s) + ${1:-300} ))
while [ $(date +%s) -lt $end ] && [ ! -f /tmp/exp/status ]; do sleep 10; done
cat /tmp/exp/status 2>/dev/null; cat /tmp/exp/chosen.env 2>/dev/null; cat /tmp/exp/choose.log 2>/dev/null
cat /tmp/exp/jobs.log 2>/dev/null; tail -n 3 /tmp/exp/assemble.log 2>/dev/null
for f in /tmp/exp/*.log; do echo "== $f"; tail -c 400 $f | tr '\r' '\n' | tail -n 2; done
wc -l /tmp/exp/*.jsonl 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
tar czf $OUT/results.tgz -C /tmp exp res 2>/dev/null; ls -la $OUT
