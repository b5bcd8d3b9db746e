"""Prefill latency and memory of DHSA against dense attention (paper Figures 7-10, Table 5).

Modes:
  kernel  one attention layer on the GPU, lengths x densities, each method of utils/bench/latency_methods.py timed the
          same way (parts select / attn / total): SDPA flash (FA2) and cuDNN, DHSA (fused selection + Triton
          kernel), the block-aligned DHSA path (Triton block kernel and FlexAttention), the block_sparse baseline
          through the same block kernel, and any other registry method named in --methods. Each sparse output is
          checked against the PyTorch executor on the same selection, and the kernel at full density against
          dense SDPA.
  cpu     the same on the CPU: DHSA (PyTorch path) vs dense attention (paper Figure 9); total = select + attn.
  e2e     prefill of a whole model (random weights with a published architecture, or a real model): latency
          and peak memory, dense vs DHSA. Latency does not depend on weight values; the CSV says so.
  batch   several sequences: DHSA per example in a loop (as the paper) and batched, vs batched dense SDPA.
  decode  one decode step (one new query, a KV cache of --lengths keys): dense SDPA vs each registry method's sparse
          decode as a patched model runs it with decode="sparse" (utils/bench/latency_decode.py; DHSA: Algorithm 2,
          selection inside the timed step). CUDA by default, --device cpu for small lengths. Resumes: a rerun
          skips the (shape, dtype, batch, length, density, method) whose "total" row the CSV already holds.
  plot    speedup-vs-length plots from the CSVs in --out.

Layer shapes and e2e models are entries of utils/models/specs.py (--shape llama-3.1-8b, qwen2.5-coder-1.5b-instruct,
...). Timing (utils/bench/latency.py): CUDA events, warm-up calls first, median of --repeats. Every run appends rows to
<out>/<mode>_<device>.csv as it goes and redraws the plots.

    python run_latency_test.py --mode cpu --lengths 16384 --density 0.0625
    python run_latency_test.py --mode kernel --lengths 8192 32768 131072 --densities 0.0625 0.125 0.25
    python run_latency_test.py --mode e2e --models llama-3.1-8b-instruct --lengths 131072 --density 0.0625
    python run_latency_test.py --mode decode --shape llama-3.1-8b --lengths 8192 32768 131072 --density 0.0625
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from utils import kernels
from utils.attention import sparse_attention
from utils.config import SparseAttentionConfig
from utils.runs.cli import add_config_args, config_from_args
from utils.bench.latency import Results, device_name, measure, random_qkv, rel_err, sdpa_backend
from utils.bench.latency_batch import batch_mode
from utils.bench.latency_cpu import cpu_interleaved, e2e_cpu_interleaved
from utils.bench.latency_decode import DECODE_DEFAULTS, DENSE_DECODE, decode_method_names, decode_mode
from utils.bench.latency_methods import (CPU_DEFAULTS, KERNEL_DEFAULTS, LAYER_METHODS, LayerMethod, kernel_config_variants,
                                   layer_contexts, reference)
from utils.bench.latency_plots import plot
from utils.models.specs import MODELS, find_spec, get_spec
from utils.selection import full_selection


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def layer_shape(name: str) -> dict:
    """Attention shape of one layer of a model of utils/models/specs.py: heads, KV heads, head dim, scale, soft-cap;
    or a bare shape "HqxHkvxD" (e.g. 8x2x64: 8 query heads, 2 KV heads, head dim 64, no soft-cap)."""
    bare = re.fullmatch(r"(\d+)x(\d+)x(\d+)", name.strip())
    if bare:
        heads, kv_heads, head_dim = map(int, bare.groups())
        return dict(name=name, heads=heads, kv_heads=kv_heads, head_dim=head_dim, scale=None, softcap=None)
    return get_spec(name).layer_shape()


def dhsa_config(density: float, args) -> SparseAttentionConfig:
    """The shared config (utils/config.py defaults, overridden by its flags) at one density of the sweep."""
    return config_from_args(args, method="dhsa", density=density, budget=None)


def layer_methods(args) -> dict[str, LayerMethod]:
    """The latency table plus this run's extra Triton configs (--kernel-configs) as dhsa_cfgN."""
    return {**LAYER_METHODS, **kernel_config_variants(args.kernel_configs)}


# ------------------------------------------------------------------------------------------------ kernel and cpu modes

def layer_mode(args, results: Results) -> None:
    """One attention layer of each --shape: every method of --methods, per length (dense once, sparse per
    density). On the CPU the methods of one length run interleaved (cpu_interleaved)."""
    for name in args.shapes:
        shape = layer_shape(name)
        softcap = shape["softcap"] if args.softcap else None
        table = layer_methods(args)
        methods = [table[m] for m in args.methods if softcap is None or table[m].softcap]
        if args.device == "cpu":
            cpu_interleaved(methods, shape, args, results, lambda density: dhsa_config(density, args))
        else:
            _layer_lengths(methods, shape, softcap, args, results)


def _layer_lengths(methods, shape: dict, softcap, args, results: Results) -> None:
    for L in args.lengths:
        q, k, v = random_qkv(shape, args.batch, L, args.torch_dtype, args.device, seed=L)
        base = dict(shape=shape["name"], dtype=args.dtype, batch=args.batch, length=L)
        dense_ms = {}
        for method in (m for m in methods if m.dense):
            time_method(method, q, k, v, None, dict(base, density=1.0), shape, args, results, dense_ms)
        if args.mode == "kernel" and L == args.lengths[0] and softcap is None and "dhsa" in args.methods:
            full_density_check(q, k, v, shape, args, dict(base, density=1.0), results)
        for density in args.densities:
            config = dhsa_config(density, args)
            for method in (m for m in methods if not m.dense):
                if method.kernels or L <= args.max_reference_length:
                    time_method(method, q, k, v, config, dict(base, density=density), shape, args, results, dense_ms)
        del q, k, v
        if args.device == "cuda":
            torch.cuda.empty_cache()


def time_method(method: LayerMethod, q, k, v, config, row: dict, shape: dict, args, results: Results,
                dense_ms: dict) -> None:
    """The one timing loop. Dense: part "total". Sparse: "select" (as a layer after the first, which reuses the
    first layer's chunk boundaries as in a patched model), "attn" (on that selection) and "total"
    (attend(select()); on the CPU the sum of the two medians, to save time), the total row with the relative error
    against the PyTorch executor on the same selection (GPU only: on the CPU the executor is the method's own
    path). dense_ms collects the dense medians for the speed-up columns. A failure gives an "error" row."""
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    row = dict(row, method=method.name, **({"note": f"{results.note}; {method.note}"} if method.note else {}))

    def timed(fn):
        return measure(fn, args.device, args.warmup, args.repeats)

    def speedups(ms):
        return {column: dense_ms[name] / ms if name in dense_ms else ""
                for column, name in (("speedup_vs_flash", "sdpa_flash"), ("speedup_vs_cudnn", "sdpa_cudnn"),
                                     ("speedup_vs_dense", "sdpa"))}

    first, later = layer_contexts()

    def select():
        return method.select(q, k, v, config, later())

    try:
        with contextlib.nullcontext() if method.kernels else kernels.disabled():
            if method.dense:
                plan = method.select(q, k, v, config, first) if method.select else None
                t = timed(lambda: method.attend(q, k, v, plan, scale, softcap))
                dense_ms[method.name] = t["median_ms"]
                results.add(**row, part="total", **t)
                return
            plan = method.select(q, k, v, config, first)
            err = ""
            if args.device == "cuda":
                err = rel_err(method.attend(q, k, v, plan, scale, softcap), reference(q, k, v, plan, scale, softcap))
            t_sel = timed(select)
            t_att = timed(lambda: method.attend(q, k, v, plan, scale, softcap))
            if args.device == "cuda":
                t_all = timed(lambda: method.attend(q, k, v, select(), scale, softcap))
            else:
                t_all = dict(median_ms=t_sel["median_ms"] + t_att["median_ms"],
                             note=row.get("note", results.note) + "; total = median select + median attn")
        results.add(**row, part="select", **t_sel)
        results.add(**row, part="attn", **t_att, **speedups(t_att["median_ms"]))
        results.add(**{**row, **t_all}, part="total", **speedups(t_all["median_ms"]), rel_err=err)
    except Exception as exc:  # a backend that cannot run this shape, a launch config that does not compile, OOM
        print(f"  {method.name} at length {row['length']}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        results.add(**row, part="error", note=f"{exc}"[:160])
        if args.device == "cuda":
            torch.cuda.empty_cache()


def full_density_check(q, k, v, shape: dict, args, row: dict, results: Results) -> None:
    """The sparse kernel with every key selected equals dense attention (SDPA FlashAttention)."""
    L = q.shape[2]
    selection = full_selection(args.batch, shape["kv_heads"], L, L, dhsa_config(1.0, args).query_chunk,
                               device=args.device)
    with sdpa_backend("flash"):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=shape["scale"], enable_gqa=True)
    results.add(**row, method="dhsa_kernel_full", part="check",
                rel_err=rel_err(sparse_attention(q, k, v, selection, scale=shape["scale"]), ref))


# ------------------------------------------------------------------------------------------------ e2e mode

def e2e_mode(args, results: Results) -> None:
    from utils.models import load_model, random_model
    from utils.patch import patch_model

    device, dtype = args.device, args.torch_dtype
    for name in args.models:
        spec = find_spec(name)
        key = spec.name if spec else name
        if spec is not None and not args.real_weights:
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
            if device == "cpu":
                e2e_cpu_interleaved(model, ids, runs, args, results, base, f"{note}; weights {weights_gb:.1f} GB")
                continue
            for method, density in runs:
                if method.startswith("dense"):
                    patch_model(model, "dense")
                else:
                    patch_model(model, method, config=config_from_args(args, method=method, density=density,
                                                                       budget=None))
                # "dense": transformers' sdpa as it dispatches; "dense_flash": SDPA pinned to FlashAttention-2
                backend = method.split("_", 1)[1] if method.startswith("dense_") else None
                def forward():
                    with torch.inference_mode(), sdpa_backend(backend):
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


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("kernel", "e2e", "batch", "cpu", "decode", "plot"), required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--densities", "--density", type=float, nargs="+", default=[0.0625, 0.125, 0.25])
    p.add_argument("--shape", nargs="+", default=None,
                   help="layer shape of this published model (kernel/batch/cpu/decode modes), or HqxHkvxD (e.g. "
                        "8x2x64); kernel and cpu modes take several (one after the other)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="cpu mode: wall time (default), or the process's CPU time (with --threads 1 a measure that "
                        "other jobs on the machine disturb little: for comparing code changes on a busy box)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"kernel/cpu modes: methods of utils/bench/latency_methods.py ({', '.join(LAYER_METHODS)}); "
                        f"default kernel: {' '.join(KERNEL_DEFAULTS)}; cpu: {' '.join(CPU_DEFAULTS)}. decode mode: "
                        f"{', '.join(decode_method_names())}; default {' '.join(DECODE_DEFAULTS)} (CUDA-only ones "
                        "dropped on the CPU)")
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
    on_cpu = args.mode == "cpu" or (args.mode == "decode" and args.device == "cpu")
    args.shapes = args.shape or ["smollm2-135m" if on_cpu else "llama-3.1-8b"]
    if len(args.shapes) > 1 and args.mode not in ("kernel", "cpu"):
        fail(f"--mode {args.mode} takes one --shape; several are for the kernel and cpu modes")
    args.shape = args.shapes[0]
    if args.lengths is None:
        args.lengths = {"kernel": [8192, 16384, 32768, 65536, 131072], "cpu": [4096, 8192, 16384],
                        "batch": [8192, 16384, 32768], "e2e": [8192, 32768],
                        "decode": [4096, 8192, 16384] if on_cpu else [8192, 16384, 32768, 65536, 131072]}[args.mode]
    if any(L < 1 for L in args.lengths) or (args.mode == "decode" and min(args.lengths) < 2):
        fail("lengths must be positive (decode mode: a KV cache of at least 2 keys)")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.mode in ("cpu", "e2e") else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.mode in ("cpu", "e2e") else 5)
    if args.mode == "decode":  # a step takes well under a millisecond on the GPU: more samples, same cost
        args.warmup, args.repeats = max(args.warmup, 3), max(args.repeats, 20)
    for shape in args.shapes:
        if find_spec(shape) is None and not re.fullmatch(r"[1-9]\d*x[1-9]\d*x[1-9]\d*", shape.strip()):
            fail(f"unknown shape {shape!r}; choose a model of utils/models/specs.py ({', '.join(MODELS)}) "
                 "or give HqxHkvxD, e.g. 8x2x64")
    args.kernel_configs = json.loads(args.kernel_configs) if args.kernel_configs else []
    if args.kernel_configs and args.mode != "kernel":
        fail("--kernel-configs times Triton launch configs: use it with --mode kernel")
    table = layer_methods(args)
    if args.mode in ("kernel", "cpu"):
        args.methods = args.methods or list(KERNEL_DEFAULTS if args.mode == "kernel" else CPU_DEFAULTS)
        args.methods += [name for name in table if name.startswith("dhsa_cfg") and name not in args.methods]
        unknown = [name for name in args.methods if name not in table]
        if unknown:
            fail(f"unknown method(s) {unknown}; choose from {', '.join(table)}")
        gpu_only = [name for name in args.methods if table[name].cuda_only and args.device != "cuda"]
        if gpu_only:
            fail(f"{', '.join(gpu_only)} need(s) a CUDA GPU (--mode kernel); drop them from --methods")
    if args.mode == "decode":
        names = decode_method_names()
        cuda_only = [name for name, entry in DENSE_DECODE.items() if entry.cuda_only]
        args.methods = args.methods or [m for m in DECODE_DEFAULTS if args.device == "cuda" or m not in cuda_only]
        unknown = [name for name in args.methods if name not in names]
        if unknown:
            fail(f"unknown decode method(s) {unknown}; choose from {', '.join(names)}")
        gpu_only = [name for name in args.methods if name in cuda_only and args.device != "cuda"]
        if gpu_only:
            fail(f"{', '.join(gpu_only)} need(s) a CUDA GPU; drop them from --methods or use --device cuda")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "plot":
        for path in plot(args.out):
            print(path)
        return
    torch.manual_seed(0)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    where = device_name(args.device)
    if args.device == "cpu":
        where += f", {torch.get_num_threads()} threads"
    note = args.note or f"torch {torch.__version__}; {where}"
    # decode mode times sparse decode steps whatever --decode says (dense steps are its "sdpa" rows)
    results = Results(args.out, args.mode, args.device, note, decode="sparse" if args.mode == "decode" else args.decode)
    print(f"{args.mode} mode on {where}; command: {' '.join(sys.argv)}", flush=True)
    {"kernel": layer_mode, "e2e": e2e_mode, "cpu": layer_mode,
     "batch": lambda a, r: batch_mode(a, r, layer_shape(a.shape), lambda density: dhsa_config(density, a)),
     "decode": lambda a, r: decode_mode(a, r, layer_shape(a.shape), lambda density: dhsa_config(density, a)),
     }[args.mode](args, results)
    try:
        plot(args.out)
    except Exception as exc:  # plots are a convenience; the CSV is the result
        print(f"(plot skipped: {exc})")
    print(f"\nresults: {results.path}")
    print(results.table())


if __name__ == "__main__":
    main()
