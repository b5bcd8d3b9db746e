"""CPU timing loops of run_latency_test.py: one layer with every method interleaved per round (`--mode cpu`) and a
whole model's prefill with its attention timed (`--mode e2e --device cpu`). Interleaving makes a change in the
machine's load hit every method alike; speed-ups come from the minima.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from utils import kernels
from utils.runs.cli import config_from_args
from utils.bench.latency import Results, random_qkv
from utils.bench.latency_methods import LayerMethod, layer_contexts


def cpu_interleaved(methods: list[LayerMethod], shape: dict, args, results: Results, config_for) -> None:
    """CPU timing of one layer: per length, every method once per round (dense SDPA, then each sparse method at
    each density, selection included: select() then attend() on it), --warmup + --repeats rounds, so that a
    change in the machine's load hits every method alike. Rows: "select", "attn", "total" (sparse; from the same
    calls) and "total" (dense); speed-ups from the minima (the least disturbed run), medians in the CSV too.
    config_for(density) gives the sparse methods' config at one density of the sweep."""
    import statistics
    import time

    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for L in args.lengths:
        q, k, v = random_qkv(shape, args.batch, L, args.torch_dtype, "cpu", seed=L)
        base = dict(shape=shape["name"], dtype=args.dtype, batch=args.batch, length=L)
        entries = []  # (row, select or None, attend, plan for dense)
        for method in methods:
            densities = [1.0] if method.dense else args.densities
            for density in densities:
                if not method.dense and not (method.kernels or L <= args.max_reference_length):
                    continue
                config = None if method.dense else config_for(density)
                row = dict(base, density=density, method=method.name,
                           **({"note": f"{results.note}; {method.note}"} if method.note else {}))
                first, later = layer_contexts()
                try:
                    with contextlib.nullcontext() if method.kernels else kernels.disabled():
                        plan = method.select(q, k, v, config, first) if method.select else None
                except Exception as exc:
                    print(f"  {method.name} at length {L}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
                    results.add(**row, part="error", note=f"{exc}"[:160])
                    continue
                if method.dense:
                    entries.append((row, method, None, plan))
                else:
                    entries.append((row, method, (lambda m=method, c=config, lt=later: m.select(q, k, v, c, lt())),
                                    None))
        times = {i: {"select": [], "attn": [], "total": []} for i in range(len(entries))}
        failed = set()
        for rnd in range(args.warmup + args.repeats):
            for i, (row, method, select, plan) in enumerate(entries):
                if i in failed:
                    continue
                try:
                    with contextlib.nullcontext() if method.kernels else kernels.disabled():
                        t0 = clock()
                        plan_i = select() if select is not None else plan
                        t1 = clock()
                        method.attend(q, k, v, plan_i, scale, softcap)
                        t2 = clock()
                except Exception as exc:
                    print(f"  {method.name} at length {L}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
                    results.add(**row, part="error", note=f"{exc}"[:160])
                    failed.add(i)
                    continue
                if rnd >= args.warmup:
                    for part, t in (("select", t1 - t0), ("attn", t2 - t1), ("total", t2 - t0)):
                        times[i][part].append(t * 1e3)
        dense_min = {}
        for i, (row, method, select, _) in enumerate(entries):
            if method.dense and i not in failed:
                dense_min[method.name] = min(times[i]["total"])
        for i, (row, method, select, _) in enumerate(entries):
            if i in failed:
                continue
            parts = ("total",) if method.dense else ("select", "attn", "total")
            for part in parts:
                ts = times[i][part]
                speed = {}
                if part == "total" and "sdpa" in dense_min:
                    speed["speedup_vs_dense"] = dense_min["sdpa"] / min(ts)
                note = row.get("note", results.note) + f"; interleaved, {len(ts)} runs, speed-up from the minima" \
                    + ("; CPU time of the process (all threads), not wall time" if args.clock == "process" else "")
                results.add(**{**row, "note": note}, part=part, median_ms=statistics.median(ts), min_ms=min(ts),
                            max_ms=max(ts), **speed)
        del q, k, v


def e2e_cpu_interleaved(model, ids, runs, args, results: Results, base: dict, note: str) -> None:
    """CPU prefill of a whole model, the methods interleaved (one forward each per round, --warmup + --repeats
    rounds), each forward with its attention timed (utils.bench.latency.attention_timer: the model's attention function,
    i.e. the attention itself without the projections). Rows: part "prefill" (speed-up from the minima) and part
    "attn" (the attention time of the fastest forward; its share in the note and printed)."""
    import statistics
    import time

    from utils.bench.latency import attention_timer
    from utils.patch import patch_model

    def patch(method, density):
        if method.startswith("dense"):
            patch_model(model, "dense")
        else:
            patch_model(model, method, config=config_from_args(args, method=method, density=density, budget=None))

    samples = {run: [] for run in runs}  # (total s, attention s) per timed forward
    for rnd in range(args.warmup + args.repeats):
        for method, density in runs:
            patch(method, density)
            with torch.inference_mode(), attention_timer(model.config._attn_implementation) as clock:
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=args.use_cache, logits_to_keep=1)
                total = time.perf_counter() - t0
            if rnd >= args.warmup:
                samples[(method, density)].append((total, clock["seconds"]))
    patch_model(model, "dense")
    dense = [min(t for t, _ in samples[r]) for r in runs if r[0] == "dense"]
    for (method, density), got in samples.items():
        totals = [t * 1e3 for t, _ in got]
        best, attn = min(got)
        share = attn / best
        row = dict(base, density=density, method=method)
        where = f"{note}; use_cache={args.use_cache}; interleaved, {len(got)} runs, speed-up from the minima"
        results.add(**row, part="prefill", median_ms=statistics.median(totals), min_ms=min(totals),
                    max_ms=max(totals), speedup_vs_dense=dense[0] / best if dense else "", note=where)
        results.add(**row, part="attn", median_ms=attn * 1e3, min_ms=attn * 1e3, max_ms=attn * 1e3,
                    note=f"{where}; attention {100 * share:.1f}% of the fastest prefill")
        print(f"  {base['shape']} {base['length']} {method} {density}: prefill {best:.2f} s, attention {attn:.2f} s "
              f"({100 * share:.1f}%)", flush=True)


__all__ = ["cpu_interleaved", "e2e_cpu_interleaved"]
