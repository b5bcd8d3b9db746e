#!/usr/bin/env bash
# One H200 call (device tool): kernel-mode select + attend of today's default and each candidate's flags, both
# layer shapes, 16K / 32K / 128K, into $OUT/kernel_<name>.csv. Usage (from the repo root, on the device):
#   bash notes/cpu_testbed/gpu_rescore/run_round.sh "default=" "a=--head-pooling mean --token-rescore 2 --rescore-queries 4"
set -u
for spec in "$@"; do
    name=${spec%%=*}; flags=${spec#*=}
    python3 run_latency_test.py --mode kernel --shape 14x2x64 12x2x128 --densities 0.0625 --min-budget 512 \
        --lengths 16384 32768 131072 --methods sdpa_flash dhsa $flags --out "$OUT/kernel_$name.csv" \
        --note "flags: $flags" 2>&1 | grep -E "dhsa +total" | sed "s/^/$name /"
done
