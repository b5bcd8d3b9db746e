"""Times utils/methods/dhsa/fused_rescore.py's two kernels on one GPU at one layer's shape, per config (scratch
driver for RULE.md round 7): python notes/cpu_testbed/gpu_rescore/tune.py --shape 14x2x64 --length 131072"""
import argparse
import itertools
import math

import torch
import triton

from utils.methods.dhsa.fused import pick_keys
from utils.methods.dhsa.fused_rescore import rescore_candidates

p = argparse.ArgumentParser()
p.add_argument("--shape", default="14x2x64")
p.add_argument("--length", type=int, default=131072)
p.add_argument("--density", type=float, default=0.0625)
args = p.parse_args()
Hq, H, D = map(int, args.shape.split("x"))
L, T = args.length, 64
K = max(512, int(args.density * L))
W = 2 * K
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(Hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
k = torch.randn(H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
ends = torch.arange(16, L + 16, 16, device="cuda").clamp(max=L)
n_tiles = math.ceil(L / T)
scores = torch.randn(H, n_tiles, ends.numel(), device="cuda", generator=g)
cand, _ = pick_keys(scores, ends, num_queries=L, q_offset=0, budget=W, query_chunk=T, sink_tokens=64,
                    local_tokens=128, num_slots=W, forced_budget=K)
ms = lambda f: triton.testing.do_bench(f, warmup=5, rep=40)  # noqa: E731
print(f"{args.shape} L={L} K={K} W={W}  pick(W): {ms(lambda: pick_keys(scores, ends, num_queries=L, q_offset=0, budget=W, query_chunk=T, sink_tokens=64, local_tokens=128, num_slots=W, forced_budget=K)):.2f} ms")
import utils.methods.dhsa.fused_rescore as fr
weight = torch.randn(H, n_tiles, W, device="cuda", generator=g)
key_index = torch.empty(H, n_tiles, K, dtype=torch.long, device="cuda")
counts = torch.empty(H, n_tiles, dtype=torch.int32, device="cuda")
for warps in (4, 8, 16, 32):
    keep = lambda: fr._keep_best_kernel[(n_tiles, H)](  # noqa: E731
        weight, cand, key_index, counts, weight.stride(0), weight.stride(1), cand.stride(0), cand.stride(1),
        key_index.stride(0), key_index.stride(1), counts.stride(0), W, K, K, W_P2=triton.next_power_of_2(W),
        FILL=1024, num_warps=warps)
    print(f"keep_best warps={warps}: {ms(keep):.2f} ms", flush=True)
ref = None
for bw, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
    cfg = dict(block_w=bw, num_warps=warps, num_stages=stages)
    try:
        run = lambda: rescore_candidates(q, k, cand, budget=K, query_chunk=T, q_offset=0, sink_tokens=64,  # noqa
                                         local_tokens=128, rescore_queries=4, config=cfg)
        out = run()[0]
        same = "" if ref is None else f" same={torch.equal(out, ref)}"
        ref = out if ref is None else ref
        print(f"block_w={bw:4d} warps={warps} stages={stages}: {ms(run):8.2f} ms{same}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"block_w={bw} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
