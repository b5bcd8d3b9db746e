"""Times the parts of the fused selection with rescore_window on one GPU at one layer's shape (scratch driver for
RULE.md round 11): PYTHONPATH=. python notes/cpu_testbed/gpu_rescore/tune_window.py --shape 14x2x64"""
import argparse
import math

import torch
import triton

from utils.config import DHSAOptions
from utils.methods.dhsa.fused import dhsa_select_fused, merge_sorted, pick_keys
from utils.methods.dhsa.fused_rescore import rescore_candidates

p = argparse.ArgumentParser()
p.add_argument("--shape", default="14x2x64")
p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
p.add_argument("--window", type=int, default=512)
p.add_argument("--rescore", type=float, default=3.0)
args = p.parse_args()
Hq, Hkv, D = map(int, args.shape.split("x"))
ms = lambda f: triton.testing.do_bench(f, warmup=5, rep=50)  # noqa: E731
for L in args.lengths:
    T, K = 64, max(512, L // 16)
    C = args.window
    keep_w, band_w = K - C, K - C + math.ceil(args.rescore * C)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ends = torch.arange(16, L + 16, 16, device="cuda").clamp(max=L)
    n_tiles = math.ceil(L / T)
    kq = k.repeat_interleave(Hq // Hkv, 1)  # one selection per query head, as head_pooling "none"
    scores = torch.randn(Hq, n_tiles, ends.numel(), device="cuda", generator=g)
    common = dict(num_queries=L, q_offset=0, query_chunk=T, sink_tokens=64, local_tokens=128, forced_budget=K)
    pick_plain = lambda: pick_keys(scores, ends, budget=K, num_slots=K, **common)  # noqa: E731
    pick_band = lambda: pick_keys(scores, ends, budget=keep_w, num_slots=keep_w, band_budget=band_w, **common)  # noqa
    _, _, band, _ = pick_band()
    resc = lambda: rescore_candidates(q[0], kq[0], band, budget=C, query_chunk=T, q_offset=0, sink_tokens=0,  # noqa
                                      local_tokens=0, rescore_queries=4)
    keep, keep_counts, band, _ = pick_band()
    chosen, chosen_counts = resc()
    merge = lambda: merge_sorted(keep, keep_counts, chosen, chosen_counts)  # noqa: E731
    opts = DHSAOptions(head_pooling="mean", token_rescore=args.rescore, rescore_queries=4, rescore_window=C)
    whole = lambda: dhsa_select_fused(q, kq, budget=K, boundaries=[ends], options=opts)  # noqa: E731
    plain = lambda: dhsa_select_fused(q, kq, budget=K, boundaries=[ends], options=DHSAOptions(head_pooling="mean"))  # noqa
    print(f"{args.shape} L={L} K={K} keep={keep_w} band={band_w - keep_w}: pick {ms(pick_plain):.2f} ms, pick+band "
          f"{ms(pick_band):.2f}, rescore {ms(resc):.2f}, merge {ms(merge):.2f}; whole selection {ms(whole):.2f} vs "
          f"plain {ms(plain):.2f}", flush=True)
