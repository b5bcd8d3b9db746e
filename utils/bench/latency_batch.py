"""Batch timing of run_latency_test.py (`--mode batch`): DHSA per example in a loop (as the paper) and batched, against
batched dense SDPA, for one layer shape.
"""

from __future__ import annotations

import torch

from utils.attention import dense_attention
from utils.bench.latency import Results, measure, random_qkv
from utils.bench.latency_methods import LAYER_METHODS
from utils.methods import LayerContext


def batch_mode(args, results: Results, shape: dict, config_for) -> None:
    """Several sequences of one layer `shape`: DHSA per example in a loop (as the paper) and batched, against
    batched dense SDPA; config_for(density) gives DHSA's config."""
    device, dtype = args.device, args.torch_dtype
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    dhsa = LAYER_METHODS["dhsa"]
    for L in args.lengths:
        for B in args.batch_sizes:
            base = dict(shape=shape["name"], dtype=args.dtype, batch=B, length=L)
            try:
                q, k, v = random_qkv(shape, B, L, dtype, device, seed=L + B)
            except torch.OutOfMemoryError:
                results.add(**base, method="inputs", part="OOM")
                continue
            t_dense = None
            try:
                t = measure(lambda: dense_attention(q, k, v, scale=scale, softcap=softcap), device, args.warmup,
                            args.repeats)
                t_dense = t["median_ms"]
                results.add(**base, density=1.0, method="dense_batched", part="total", **t)
            except torch.OutOfMemoryError:
                results.add(**base, density=1.0, method="dense_batched", part="OOM")
            for density in args.densities:
                cfg = config_for(density)

                def one(qb, kb, vb):
                    return dhsa.attend(qb, kb, vb, dhsa.select(qb, kb, vb, cfg, LayerContext()), scale, softcap)

                def loop():
                    return [one(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(B)]
                for name, fn in (("dhsa_loop", loop), ("dhsa_batched", lambda: one(q, k, v))):
                    try:
                        t = measure(fn, device, args.warmup, args.repeats)
                        results.add(**base, density=density, method=name, part="total", **t,
                                    speedup_vs_dense=t_dense / t["median_ms"] if t_dense else "")
                    except torch.OutOfMemoryError:
                        results.add(**base, density=density, method=name, part="OOM")
            del q, k, v
            if device == "cuda":
                torch.cuda.empty_cache()


__all__ = ["batch_mode"]
