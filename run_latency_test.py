"""Prefill latency and memory of DHSA against dense attention (paper Figures 7-10, Table 5).

Modes:
  kernel  one attention layer on the GPU, lengths x densities: SDPA flash (FA2), SDPA cuDNN, DHSA (fused
          selection + Triton kernel), the block-aligned DHSA path (Triton block kernel and FlexAttention), the
          block_sparse baseline through the same block kernel. Each sparse output is checked against the
          PyTorch executor on the same selection, and the kernel at full density against dense SDPA.
  e2e     prefill of a whole model (random weights with a published architecture, or a real model): latency
          and peak memory, dense vs DHSA. Latency does not depend on weight values; the CSV says so.
  batch   several sequences: DHSA per example in a loop (as the paper) and batched, vs batched dense SDPA.
  cpu     one attention layer on the CPU: DHSA (PyTorch path) vs torch SDPA (paper Figure 9).
  plot    speedup-vs-length plots from the CSVs in --out.

Timing: CUDA events (host clock + synchronize on the CPU), warm-up calls first, median of --repeats. Every run
appends rows to <out>/<mode>_<device>.csv as it goes and redraws the plots.

    python run_latency_test.py --mode cpu --lengths 16384 --density 0.0625
    python run_latency_test.py --mode kernel --lengths 8192 32768 131072 --densities 0.0625 0.125 0.25
    python run_latency_test.py --mode e2e --models llama-3.1-8b-instruct --lengths 131072 --density 0.0625
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.attention import full_selection, sparse_attention
from utils.boundaries import FixedSizeBoundaries
from utils.config import SparseAttentionConfig, add_config_args, config_from_args
from utils.dhsa import dhsa_select
from utils.runs import append_csv

SHAPE_ALIASES = {"llama-3.1-8b": "llama-3.1-8b-instruct", "qwen2.5-3b": "qwen2.5-3b-instruct",
                 "gemma-2-2b": "gemma-2-2b-it"}
KERNEL_METHODS = ("sdpa_flash", "sdpa_cudnn", "sdpa_default", "dhsa", "dhsa_block", "dhsa_block_flex", "block_sparse",
                  "dhsa_sdpa")
COLUMNS = ("mode", "device", "shape", "dtype", "batch", "length", "density", "decode", "method", "part", "median_ms",
           "min_ms", "max_ms", "speedup_vs_flash", "speedup_vs_cudnn", "speedup_vs_dense", "rel_err",
           "peak_gb", "note")


# ------------------------------------------------------------------------------------------------ helpers

def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def layer_shape(name: str) -> dict:
    """Attention shape of one layer of a published model: heads, KV heads, head dim, scale, soft-cap."""
    from utils.models import PUBLISHED_CONFIGS

    key = SHAPE_ALIASES.get(name.lower(), name.lower())
    if key not in PUBLISHED_CONFIGS:
        fail(f"unknown shape {name!r}; choose from {', '.join(list(SHAPE_ALIASES) + list(PUBLISHED_CONFIGS))}")
    c = PUBLISHED_CONFIGS[key]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    scalar = c.get("query_pre_attn_scalar")
    return dict(name=key, heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=head_dim,
                scale=(scalar ** -0.5) if scalar else None, softcap=c.get("attn_logit_softcapping"))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "_")
    return (platform.processor() or platform.machine() or "cpu").replace(" ", "_")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, repeats: int) -> dict:
    """Median / min / max milliseconds of fn() after `warmup` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def random_qkv(shape: dict, batch: int, length: int, dtype, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, shape["heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    return q, k, v


class Results:
    """Rows appended to <out>/<mode>_<device>.csv as they are measured (utils/runs.py append_csv: one line per row,
    crash-safe); prints a table at the end. `decode`: the config's decode protocol, recorded in every row."""

    def __init__(self, out_dir: Path, mode: str, device: str, note: str, decode: str = ""):
        self.path = out_dir / f"{mode}_{device_name(device)}.csv"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rows, self.mode, self.device, self.note, self.decode = [], mode, device_name(device), note, decode

    def add(self, **row) -> dict:
        row = {"mode": self.mode, "device": self.device, "decode": self.decode, "note": self.note, **row}
        for key in ("median_ms", "min_ms", "max_ms"):
            if isinstance(row.get(key), float):
                row[key] = round(row[key], 4)
        self.rows.append(row)
        append_csv(self.path, row, COLUMNS)
        return row

    def table(self) -> str:
        lines = [f"{'L':>7} {'dens':>6} {'method':<16} {'part':<7} {'ms':>10} {'x flash':>8} {'x cudnn':>8} "
                 f"{'x dense':>8} {'rel_err':>9} {'peak GB':>8}"]
        for r in self.rows:
            def f(key, fmt):
                width = fmt.split(".")[0]
                return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else format("-", f">{width}")
            lines.append(f"{r.get('length', ''):>7} {str(r.get('density', '')):>6} {r['method']:<16} "
                         f"{r.get('part', ''):<7} {f('median_ms', '10.3f')} {f('speedup_vs_flash', '8.2f')} "
                         f"{f('speedup_vs_cudnn', '8.2f')} {f('speedup_vs_dense', '8.2f')} {f('rel_err', '9.2e')} "
                         f"{f('peak_gb', '8.2f')}")
        return "\n".join(lines)


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def dhsa_config(density: float, args) -> SparseAttentionConfig:
    """The shared config (utils/config.py defaults, overridden by its flags) at one density of the sweep."""
    return config_from_args(args, method="dhsa", density=density, budget=None)


def select_options(cfg: SparseAttentionConfig) -> dict:
    """dhsa_select's keyword options from the config (the same the patched model uses)."""
    return dict(robust=cfg.robust_chunk_repr, sink_tokens=cfg.sink_tokens, local_tokens=cfg.local_tokens,
                share_heads=cfg.share_heads)


def fixed_boundaries(k: torch.Tensor, cfg: SparseAttentionConfig) -> list[torch.Tensor]:
    return FixedSizeBoundaries(cfg.chunk_size)(k, cfg.num_chunks(k.shape[2]))


# ------------------------------------------------------------------------------------------------ kernel mode

def kernel_mode(args, results: Results) -> None:
    from utils import kernels
    from utils.kernels.select import blocks_from_token_selection, dhsa_block_select

    device, dtype = "cuda", args.torch_dtype
    shape = layer_shape(args.shape)
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    methods = args.methods or list(KERNEL_METHODS)
    G = shape["heads"] // shape["kv_heads"]
    for L in args.lengths:
        q, k, v = random_qkv(shape, args.batch, L, dtype, device, seed=L)
        base = dict(shape=shape["name"], dtype=args.dtype, batch=args.batch, length=L)
        dense = {}
        if softcap is None:
            k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # dense gets K/V per query head
            for name in ("flash", "cudnn"):
                if f"sdpa_{name}" not in methods:
                    continue
                def run(name=name):
                    with sdpa_backend(name):
                        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)
                try:
                    t = measure(run, device, args.warmup, args.repeats)
                    dense[name] = t["median_ms"]
                    results.add(**base, density=1.0, method=f"sdpa_{name}", part="total", **t)
                except RuntimeError as e:  # backend unavailable for this shape
                    results.add(**base, density=1.0, method=f"sdpa_{name}", part="error", note=str(e)[:120])
            del k_rep, v_rep
            if "sdpa_default" in methods:  # no backend pinned, GQA inside SDPA: what transformers' "sdpa" runs
                t = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                   enable_gqa=True), device, args.warmup, args.repeats)
                results.add(**base, density=1.0, method="sdpa_default", part="total", **t)
            if L == args.lengths[0] and "dhsa" in methods:  # the kernel at full density equals dense attention
                sel = full_selection(args.batch, shape["kv_heads"], L, L, dhsa_config(1.0, args).query_chunk,
                                     device=device)
                with sdpa_backend("flash"):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                results.add(**base, density=1.0, method="dhsa_kernel_full", part="check",
                            rel_err=rel_err(sparse_attention(q, k, v, sel, scale=scale), ref))
                del sel, ref

        def speedups(ms):
            return dict(speedup_vs_flash=dense["flash"] / ms if "flash" in dense else "",
                        speedup_vs_cudnn=dense["cudnn"] / ms if "cudnn" in dense else "")

        for density in args.densities:
            cfg = dhsa_config(density, args)
            budget = cfg.resolve_budget(L)
            row = dict(base, density=density)
            opts = select_options(cfg)

            def select():
                ends = fixed_boundaries(k, cfg)
                return dhsa_select(q, k, budget=budget, boundaries=ends, query_chunk=cfg.query_chunk,
                                   query_pooling=cfg.query_pooling, **opts)

            if "dhsa" in methods or "dhsa_sdpa" in methods:
                sel = select()
                with kernels.disabled():
                    ref = sparse_attention(q, k, v, sel, scale=scale, softcap=softcap)
            if "dhsa" in methods:
                out = sparse_attention(q, k, v, sel, scale=scale, softcap=softcap)
                err = rel_err(out, ref)
                del out
                t_sel = measure(select, device, args.warmup, args.repeats)
                t_att = measure(lambda: sparse_attention(q, k, v, sel, scale=scale, softcap=softcap), device,
                                args.warmup, args.repeats)
                t_all = measure(lambda: sparse_attention(q, k, v, select(), scale=scale, softcap=softcap), device,
                                args.warmup, args.repeats)
                results.add(**row, method="dhsa", part="select", **t_sel)
                results.add(**row, method="dhsa", part="attn", **t_att, **speedups(t_att["median_ms"]))
                results.add(**row, method="dhsa", part="total", **t_all, **speedups(t_all["median_ms"]), rel_err=err)
                for i, extra in enumerate(args.kernel_configs or []):
                    from utils.kernels.sparse_prefill import sparse_prefill
                    counts = sel.counts if getattr(sel, "counts", None) is not None else None
                    def variant(extra=extra):
                        return sparse_prefill(q, k, v, sel.key_index, counts, query_chunk=sel.query_chunk,
                                              q_offset=sel.q_offset, scale=scale, softcap=softcap, config=extra,
                                              sorted_keys=counts is not None)
                    try:
                        e = rel_err(variant(), ref)
                        t = measure(variant, device, args.warmup, args.repeats)
                        results.add(**row, method=f"dhsa_cfg{i}", part="attn", **t, **speedups(t["median_ms"]),
                                    rel_err=e, note=str(extra))
                    except Exception as exc:  # a config that does not compile (shared memory) is reported
                        results.add(**row, method=f"dhsa_cfg{i}", part="error", note=f"{extra}: {exc}"[:160])
            if "dhsa_sdpa" in methods and L <= args.max_reference_length:
                with kernels.disabled():
                    t = measure(lambda: sparse_attention(q, k, v, dhsa_select(
                        q, k, budget=budget, boundaries=fixed_boundaries(k, cfg), query_chunk=cfg.query_chunk,
                        query_pooling=cfg.query_pooling, **opts), scale=scale, softcap=softcap), device, args.warmup, args.repeats)
                results.add(**row, method="dhsa_sdpa", part="total", **t, **speedups(t["median_ms"]))
            if "dhsa" in methods or "dhsa_sdpa" in methods:
                del sel, ref

            block_methods = [m for m in ("dhsa_block", "dhsa_block_flex") if m in methods]
            if block_methods:
                bs = cfg.block_size

                def block_select():
                    return dhsa_block_select(q, k, budget=budget, boundaries=fixed_boundaries(k, cfg), block_size=bs,
                                             **opts)
                bsel = block_select()
                from utils.kernels.select import block_selection_to_tokens
                with kernels.disabled():
                    ref = sparse_attention(q, k, v, block_selection_to_tokens(bsel, L), scale=scale, softcap=softcap)
                if "dhsa_block" in methods:
                    err = rel_err(sparse_attention(q, k, v, bsel, scale=scale, softcap=softcap), ref)
                    t_sel = measure(block_select, device, args.warmup, args.repeats)
                    t_att = measure(lambda: sparse_attention(q, k, v, bsel, scale=scale, softcap=softcap), device,
                                    args.warmup, args.repeats)
                    t_all = measure(lambda: sparse_attention(q, k, v, block_select(), scale=scale, softcap=softcap),
                                    device, args.warmup, args.repeats)
                    results.add(**row, method="dhsa_block", part="select", **t_sel)
                    results.add(**row, method="dhsa_block", part="attn", **t_att, **speedups(t_att["median_ms"]))
                    results.add(**row, method="dhsa_block", part="total", **t_all, **speedups(t_all["median_ms"]),
                                rel_err=err)
                if "dhsa_block_flex" in methods and softcap is None:
                    from utils.kernels.flex import block_mask_from_selection, flex_block_attention
                    try:
                        mask = block_mask_from_selection(bsel, shape["heads"], L, L)
                        err = rel_err(flex_block_attention(q, k, v, bsel, scale=scale, block_mask=mask), ref)
                        t_att = measure(lambda: flex_block_attention(q, k, v, bsel, scale=scale, block_mask=mask),
                                        device, args.warmup, args.repeats)
                        t_all = measure(lambda: flex_block_attention(q, k, v, block_select(), scale=scale), device,
                                        args.warmup, args.repeats)
                        results.add(**row, method="dhsa_block_flex", part="attn", **t_att,
                                    **speedups(t_att["median_ms"]), note="FlexAttention, no selection cost")
                        results.add(**row, method="dhsa_block_flex", part="total", **t_all,
                                    **speedups(t_all["median_ms"]), rel_err=err)
                    except Exception as exc:
                        results.add(**row, method="dhsa_block_flex", part="error", note=str(exc)[:160])
                del bsel, ref

            if "block_sparse" in methods:
                from utils.baselines.block_sparse import block_sparse_select
                bs = cfg.block_size

                def bs_select():
                    sel = block_sparse_select(q, k, budget, bs)
                    return blocks_from_token_selection(sel, bs, L) or sel
                sel = bs_select()
                with kernels.disabled():
                    ref = sparse_attention(q, k, v, block_sparse_select(q, k, budget, bs), scale=scale,
                                           softcap=softcap)
                err = rel_err(sparse_attention(q, k, v, sel, scale=scale, softcap=softcap), ref)
                t_att = measure(lambda: sparse_attention(q, k, v, sel, scale=scale, softcap=softcap), device,
                                args.warmup, args.repeats)
                t_all = measure(lambda: sparse_attention(q, k, v, bs_select(), scale=scale, softcap=softcap), device,
                                args.warmup, args.repeats)
                kind = "block kernel" if getattr(sel, "block_size", None) else "token kernel"
                results.add(**row, method="block_sparse", part="attn", **t_att, **speedups(t_att["median_ms"]),
                            note=kind)
                results.add(**row, method="block_sparse", part="total", **t_all, **speedups(t_all["median_ms"]),
                            rel_err=err, note=kind)
                del sel, ref
        del q, k, v
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ cpu mode

def cpu_mode(args, results: Results) -> None:
    shape = layer_shape(args.shape)
    dtype = args.torch_dtype
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    for L in args.lengths:
        q, k, v = random_qkv(shape, args.batch, L, dtype, "cpu", seed=L)
        base = dict(shape=shape["name"], dtype=args.dtype, batch=args.batch, length=L)
        from utils.attention import dense_attention
        t_dense = measure(lambda: dense_attention(q, k, v, scale=scale, softcap=softcap), "cpu", args.warmup,
                          args.repeats)
        results.add(**base, density=1.0, method="sdpa", part="total", **t_dense)
        for density in args.densities:
            cfg = dhsa_config(density, args)
            budget = cfg.resolve_budget(L)

            def select():
                return dhsa_select(q, k, budget=budget, boundaries=fixed_boundaries(k, cfg),
                                   query_chunk=cfg.query_chunk, query_pooling=cfg.query_pooling,
                                   **select_options(cfg))
            sel = select()
            t_sel = measure(select, "cpu", args.warmup, args.repeats)
            t_att = measure(lambda: sparse_attention(q, k, v, sel, scale=scale, softcap=softcap), "cpu", args.warmup,
                            args.repeats)
            total = t_sel["median_ms"] + t_att["median_ms"]
            row = dict(base, density=density, method="dhsa")
            results.add(**row, part="select", **t_sel)
            results.add(**row, part="attn", **t_att, speedup_vs_dense=t_dense["median_ms"] / t_att["median_ms"])
            results.add(**row, part="total", median_ms=total, speedup_vs_dense=t_dense["median_ms"] / total,
                        note=results.note + "; total = median select + median attn")


# ------------------------------------------------------------------------------------------------ batch mode

def batch_mode(args, results: Results) -> None:
    device, dtype = args.device, args.torch_dtype
    shape = layer_shape(args.shape)
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    from utils.attention import dense_attention
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
                cfg = dhsa_config(density, args)
                budget = cfg.resolve_budget(L)

                def one(qb, kb, vb):
                    sel = dhsa_select(qb, kb, budget=budget, boundaries=fixed_boundaries(kb, cfg),
                                      query_chunk=cfg.query_chunk, query_pooling=cfg.query_pooling,
                                      **select_options(cfg))
                    return sparse_attention(qb, kb, vb, sel, scale=scale, softcap=softcap)

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


# ------------------------------------------------------------------------------------------------ e2e mode

def e2e_mode(args, results: Results) -> None:
    from utils.models import PUBLISHED_CONFIGS, load_model, random_model
    from utils.patch import patch_model

    device, dtype = args.device, args.torch_dtype
    for name in args.models:
        key = SHAPE_ALIASES.get(name.lower(), name.lower())
        if key in PUBLISHED_CONFIGS and not args.real_weights:
            model = random_model(key, dtype=dtype, device=device, num_layers=args.num_layers,
                                 attn_implementation="sdpa")
            note = "random weights (published config): latency does not depend on weight values"
            if getattr(model.config, "attn_logit_softcapping", None):
                note += "; dense = SDPA, which skips Gemma-2's logit soft-capping (DHSA applies it)"
        else:
            model, _ = load_model(name, device=device, dtype=dtype)
            note = "real weights"
        weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        vocab = model.config.vocab_size
        for L in args.lengths:
            ids = torch.randint(0, vocab, (args.batch, L), device=device,
                                generator=torch.Generator(device).manual_seed(L))
            base = dict(shape=key, dtype=args.dtype, batch=args.batch, length=L)
            dense_ms, flash_ms = None, None
            runs = [(m, d) for m in args.e2e_methods for d in ([1.0] if m.startswith("dense") else args.densities)]
            for method, density in runs:
                if method.startswith("dense"):
                    patch_model(model, "dense")
                else:
                    patch_model(model, method, config=config_from_args(args, method=method, density=density,
                                                                       budget=None))
                # "dense": transformers' sdpa as it dispatches; "dense_flash": SDPA pinned to FlashAttention-2
                backend = method.split("_", 1)[1] if method.startswith("dense_") else None
                def forward():
                    with torch.inference_mode(), (sdpa_backend(backend) if backend else _nothing()):
                        return model(input_ids=ids, use_cache=args.use_cache, logits_to_keep=1)
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    t = measure(forward, device, args.warmup, args.repeats)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else ""
                    if method == "dense":
                        dense_ms = t["median_ms"]
                    if method == "dense_flash":
                        flash_ms = t["median_ms"]
                    results.add(**base, density=density, method=method, part="prefill", **t, peak_gb=peak,
                                speedup_vs_dense=dense_ms / t["median_ms"] if dense_ms else "",
                                speedup_vs_flash=flash_ms / t["median_ms"] if flash_ms else "",
                                note=f"{note}; weights {weights_gb:.1f} GB; use_cache={args.use_cache}")
                except torch.OutOfMemoryError:
                    results.add(**base, density=density, method=method, part="OOM", note=note)
                except RuntimeError as exc:  # e.g. a pinned SDPA backend that cannot run this model's masks
                    results.add(**base, density=density, method=method, part="error", note=f"{note}; {exc}"[:200])
                if device == "cuda":
                    torch.cuda.empty_cache()
        patch_model(model, "dense")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ plots

def plot(out_dir: Path) -> list[Path]:
    """One figure per CSV: speedup of each sparse method vs length, one panel per density."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    made = []
    for path in sorted(out_dir.glob("*.csv")):
        df = pd.read_csv(path)
        col = next((c for c in ("speedup_vs_flash", "speedup_vs_dense") if c in df and df[c].notna().any()), None)
        if col is None:
            continue
        df = df[df[col].notna() & df["part"].isin(["total", "prefill"])]
        if df.empty:
            continue
        densities = sorted(df["density"].unique())
        fig, axes = plt.subplots(1, len(densities), figsize=(4.5 * len(densities), 3.6), squeeze=False)
        for ax, density in zip(axes[0], densities):
            sub = df[df["density"] == density]
            for method, grp in sub.groupby("method"):
                grp = grp.groupby("length")[col].median()
                ax.plot(grp.index, grp.values, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(col.replace("_", " "))
            ax.set_title(f"density {density:g}")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
        fig.suptitle(path.stem)
        fig.tight_layout()
        target = path.with_suffix(".png")
        fig.savefig(target, dpi=120)
        plt.close(fig)
        made.append(target)
    return made


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("kernel", "e2e", "batch", "cpu", "plot"), required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--densities", "--density", type=float, nargs="+", default=[0.0625, 0.125, 0.25])
    p.add_argument("--shape", default=None, help="layer shape of this published model (kernel/batch/cpu modes)")
    p.add_argument("--methods", nargs="+", default=None, help=f"kernel mode: subset of {', '.join(KERNEL_METHODS)}")
    p.add_argument("--models", nargs="+", default=["llama-3.1-8b-instruct"], help="e2e mode")
    p.add_argument("--e2e-methods", nargs="+", default=["dense", "dense_flash", "dhsa"],
                   help="dense (transformers sdpa as dispatched), dense_flash / dense_cudnn (SDPA backend pinned), "
                        "or any registry method")
    p.add_argument("--real-weights", action="store_true", help="e2e: load the real model instead of random weights")
    p.add_argument("--num-layers", type=int, default=None, help="e2e: keep only the first layers")
    p.add_argument("--use-cache", action=argparse.BooleanOptionalAction, default=True, help="e2e: build the KV cache")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--softcap", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the shape's logit soft-capping (Gemma-2); dense SDPA cannot, so kernel mode skips it")
    p.add_argument("--kernel-configs", type=str, default=None,
                   help="kernel mode: JSON list of extra Triton configs to time, e.g. "
                        "'[{\"rows\": 128, \"block_n\": 128, \"num_warps\": 8, \"num_stages\": 3}]'")
    p.add_argument("--max-reference-length", type=int, default=32768, help="longest L for timing dhsa_sdpa")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("results_latency"))
    p.add_argument("--note", default="")
    add_config_args(p, skip=("method", "density", "budget"))  # DHSA/baseline options, defaults of utils/config.py
    args = p.parse_args(argv)

    if any(not 0.0 < d <= 1.0 for d in args.densities):
        fail(f"densities must be in (0, 1], got {args.densities}; e.g. --density 0.0625")
    if args.mode == "plot":
        return args
    cuda = torch.cuda.is_available()
    if args.mode == "cpu":
        args.device = "cpu"
    elif args.mode == "kernel":
        if not cuda:
            fail("--mode kernel needs a CUDA GPU; on this machine use --mode cpu")
        args.device = "cuda"
    else:
        args.device = args.device or ("cuda" if cuda else "cpu")
        if args.device == "cuda" and not cuda:
            fail("no CUDA GPU here: pass --device cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.shape = args.shape or ("smollm2-135m" if args.mode == "cpu" else "llama-3.1-8b")
    if args.lengths is None:
        args.lengths = {"kernel": [8192, 16384, 32768, 65536, 131072], "cpu": [4096, 8192, 16384],
                        "batch": [8192, 16384, 32768], "e2e": [8192, 32768]}[args.mode]
    if any(L < 1 for L in args.lengths):
        fail("lengths must be positive")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.mode in ("cpu", "e2e") else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.mode in ("cpu", "e2e") else 5)
    if args.kernel_configs:
        import json
        args.kernel_configs = json.loads(args.kernel_configs)
    if args.methods:
        unknown = set(args.methods) - set(KERNEL_METHODS)
        if unknown:
            fail(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(KERNEL_METHODS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "plot":
        for path in plot(args.out):
            print(path)
        return
    torch.manual_seed(0)
    where = device_name(args.device)
    if args.device == "cpu":
        where += f", {torch.get_num_threads()} threads"
    note = args.note or f"torch {torch.__version__}; {where}"
    results = Results(args.out, args.mode, args.device, note, decode=args.decode)
    print(f"{args.mode} mode on {where}; command: {' '.join(sys.argv)}", flush=True)
    {"kernel": kernel_mode, "e2e": e2e_mode, "batch": batch_mode, "cpu": cpu_mode}[args.mode](args, results)
    try:
        plot(args.out)
    except Exception as exc:  # plots are a convenience; the CSV is the result
        print(f"(plot skipped: {exc})")
    print(f"\nresults: {results.path}")
    print(results.table())


if __name__ == "__main__":
    main()
