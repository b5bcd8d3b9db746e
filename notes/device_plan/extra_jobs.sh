#!/usr/bin/env bash
# Scratch (device): job lines after the main NIAH sweeps; $1 = Qwen model name, $2 = chosen DHSA flags.
Q=$1; FLAGS=$2
RN="python3 run_needle_in_haystack.py --densities 0.0625 --min-budget 512 --output-dir /tmp/res/results_needle --haystack-dir .carry/pg $FLAGS"
RR="python3 run_ruler.py --model $Q --densities 0.0625 --lengths 32K --num-samples 50 --output-dir /tmp/res/results_ruler $FLAGS"
LT="python3 run_latency_test.py --mode kernel --shape llama-3.1-8b --densities 0.0625 --max-reference-length 16384"
echo "y4_dense|$RN --model $Q --methods dense --rope-scaling yarn:4 --lengths 32K 64K 96K 128K"
echo "y4_dhsa|$RN --model $Q --methods dhsa --rope-scaling yarn:4 --lengths 32K 64K 96K 128K"
echo "r_niah|$RR --methods dense dhsa --tasks niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery"
echo "r_rest|$RR --methods dense dhsa --tasks vt cwe fwe qa_1 qa_2"
echo "lat_peers|$LT --lengths 32768 131072 --methods sdpa_cudnn dhsa block_sparse flexprefill xattention --out /tmp/res/results_latency $FLAGS"
echo "y2_dense|$RN --model $Q --methods dense --rope-scaling yarn:2 --lengths 32K 64K"
echo "y4_oracle|$RN --model $Q --methods oracle_topk --rope-scaling yarn:4 --lengths 32K 64K 96K 128K"
echo "y4_short|$RN --model $Q --methods dense dhsa --rope-scaling yarn:4 --lengths 1K 2K 4K 8K 16K"
echo "y4_vs|$RN --model $Q --methods vertical_slash block_sparse --rope-scaling yarn:4 --lengths 32K 64K 96K 128K"
echo "y4_peers|$RN --model $Q --methods flexprefill xattention --rope-scaling yarn:4 --lengths 32K 64K 96K 128K"
