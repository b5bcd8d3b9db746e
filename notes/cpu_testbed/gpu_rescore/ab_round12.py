"""A/B of round 12's GPU rescoring configs in one process (scratch driver): pass 1's logits kept or the keys
gathered again (KEEP_LOGITS_HEAD_DIM), and tile configs, for one selection per query head (G = 1, R = 4).
    PYTHONPATH=. python notes/cpu_testbed/gpu_rescore/ab_round12.py"""
import math
import sys

import torch
import triton

sys.path.insert(0, ".")
from utils.methods.dhsa import fused_rescore  # noqa: E402
from utils.methods.dhsa.fused import pick_keys  # noqa: E402
from utils.methods.dhsa.fused_rescore import rescore_candidates  # noqa: E402

ms = lambda f: triton.testing.do_bench(f, warmup=10, rep=100)  # noqa: E731
CONFIGS = [dict(rows=16, block_w=64, num_warps=4, num_stages=3), dict(rows=16, block_w=128, num_warps=4, num_stages=3),
           dict(rows=16, block_w=128, num_warps=8, num_stages=3), dict(rows=16, block_w=32, num_warps=2, num_stages=3),
           dict(rows=16, block_w=64, num_warps=2, num_stages=4), dict(rows=16, block_w=256, num_warps=8, num_stages=2)]
for shape, L in [("14x2x64", 32768), ("14x2x64", 131072), ("12x2x128", 32768)]:
    Hq, Hkv, D = map(int, shape.split("x"))
    T, K, C = 64, max(512, L // 16), 512
    keep_w, band_w = K - C, K - C + 3 * C
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(Hq, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g).repeat_interleave(Hq // Hkv, 0)
    ends = torch.arange(16, L + 16, 16, device="cuda").clamp(max=L)
    scores = torch.randn(Hq, math.ceil(L / T), ends.numel(), device="cuda", generator=g)
    band = pick_keys(scores, ends, num_queries=L, q_offset=0, query_chunk=T, sink_tokens=64, local_tokens=128,
                     forced_budget=K, budget=keep_w, num_slots=keep_w, band_budget=band_w)[2]
    res, ref = {}, None
    for rnd in range(2):
        for lb in (1, 0):
            fused_rescore.KEEP_LOGITS_HEAD_DIM = 0 if lb else 1 << 20
            for i, cfg in enumerate(CONFIGS):
                r = lambda: rescore_candidates(q, k, band, budget=C, query_chunk=T, q_offset=0, sink_tokens=0,  # noqa
                                               local_tokens=0, rescore_queries=4, config=cfg)
                out = r()[0]
                ref = out if ref is None else ref
                res.setdefault(f"keep{int(lb > 0)}/cfg{i}{'' if torch.equal(out, ref) else '*'}", []).append(ms(r))
    print(shape, L, " ".join(f"{n} {min(v):.3f}" for n, v in res.items()), flush=True)
print("configs:", CONFIGS)
