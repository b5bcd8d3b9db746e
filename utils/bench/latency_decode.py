"""How the latency benchmark runs one decode step (run_latency_test.py --mode decode): one new query against a KV
cache of L keys, dense attention against each registry method's sparse decode.

Entries:
  * dense (one "total" row each):
      sdpa        utils.attention.dense_attention, what `run_method` runs for a decode step with decode="dense"
                  (torch SDPA, backend as dispatched; on the CPU the G query heads of a KV head as its G queries;
                  applies soft-capping). speedup_vs_dense is against it;
      sdpa_flash, sdpa_cudnn
                  torch SDPA pinned to FlashAttention-2 / cuDNN (CUDA only). The G query heads of a GQA group are
                  passed as G queries of their KV head ([B, Hkv, G, D]: a decode query sees every key, so no mask
                  is needed), so K/V are read once, never repeated per head;
  * sparse: every registry method with a selection (dhsa, quest, streaming, ...), run as a patched model runs a
    decode step: `run_method` with decode="sparse" and the layer's own LayerContext. The first, untimed step fills
    the layer's state as the prefill would (DHSA, Algorithm 2: the chunk boundaries of the L - 1 prompt keys), the
    timed steps then reuse it. Parts: "select" (the method's selection for the step), "attn" (sparse_attention on
    that selection) and "total" (`run_method`: selection + attention, what a decode step costs).

    step = DecodeStep("dhsa", q, k, v, SparseAttentionConfig(density=0.0625))   # q [B, Hq, 1, D]
    out = step()                                                               # [B, Hq, 1, D]
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from utils.attention import dense_attention, sparse_attention, stacked_decode_attention
from utils.config import SparseAttentionConfig
from utils.bench.latency import measure, rel_err, sdpa_backend
from utils.bench.latency_methods import reference
from utils.runs import read_csv_rows
from utils.methods import METHODS, LayerContext, run_method


def _sdpa(q, k, v, scale, softcap):
    return dense_attention(q, k, v, scale=scale, softcap=softcap)


def _pinned(backend: str) -> Callable:
    def attend(q, k, v, scale, softcap):
        with sdpa_backend(backend):  # the G heads of a group as G queries of their KV head
            return stacked_decode_attention(q, k, v, scale)
    return attend


class DenseDecode(NamedTuple):
    attend: Callable  # (q [B, Hq, 1, D], k, v [B, Hkv, L, D], scale, softcap) -> [B, Hq, 1, D]
    cuda_only: bool
    softcap: bool     # applies logit soft-capping (Gemma-2); entries that cannot are skipped for such shapes


DENSE_DECODE: dict[str, DenseDecode] = {
    "sdpa": DenseDecode(_sdpa, cuda_only=False, softcap=True),
    "sdpa_flash": DenseDecode(_pinned("flash"), cuda_only=True, softcap=False),
    "sdpa_cudnn": DenseDecode(_pinned("cudnn"), cuda_only=True, softcap=False),
}
# speed-up column -> the dense entry it divides
SPEEDUP_COLUMNS = {"speedup_vs_dense": "sdpa", "speedup_vs_flash": "sdpa_flash", "speedup_vs_cudnn": "sdpa_cudnn"}
DECODE_DEFAULTS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "dhsa", "quest", "streaming")


def decode_method_names() -> list[str]:
    """Dense entries, then every registry method with a selection (all of them decode sparsely here)."""
    return list(DENSE_DECODE) + [name for name, m in METHODS.items() if m.select is not None]


def decode_inputs(shape: dict, batch: int, length: int, dtype, device: str, seed: int):
    """q [B, heads, 1, D] (the new token) and a KV cache k, v [B, kv_heads, length, D], standard normal."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, shape["heads"], 1, shape["head_dim"], generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    return q, k, v


class DecodeStep:
    """One sparse decode step of a registry method on fixed inputs, with the layer state a model would hold.

    Calling it runs the step as a patched model does (`run_method`, decode="sparse"); `select()` and
    `attend(selection)` are its two parts. Construction runs one untimed step, which fills the layer's state."""

    def __init__(self, name: str, q, k, v, config: SparseAttentionConfig, scale=None, softcap=None):
        if q.shape[2] != 1 or k.shape[2] < 2:
            raise ValueError(f"a decode step is one query against a cache of >= 2 keys; got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        self.method = METHODS[name]
        self.config = config.replace(method=name, decode="sparse")
        self.context = LayerContext(layer_idx=0)
        self.q, self.k, self.v, self.scale, self.softcap = q, k, v, scale, softcap
        self()

    def __call__(self) -> torch.Tensor:
        return run_method(self.method, self.q, self.k, self.v, self.config, self.context, scale=self.scale,
                          softcap=self.softcap)

    def select(self):
        return self.method.select(self.q, self.k, self.config, self.context)

    def attend(self, selection) -> torch.Tensor:
        return sparse_attention(self.q, self.k, self.v, selection, scale=self.scale, softcap=self.softcap)


# ------------------------------------------------------------------------------------------------ the mode

def decode_mode(args, results, shape: dict, config_for) -> None:
    """run_latency_test.py --mode decode, for the layer `shape` (a model_specs latency shape) and the sparse config
    `config_for(density)`. One decode step per length of --lengths (the KV cache) and method of --methods: dense once per length,
    sparse methods per density. Rows already in the CSV (a "total" row of the same shape, dtype, batch, length,
    density and method) are not measured again; their medians still give the speed-ups."""
    scale, softcap = shape["scale"], shape["softcap"] if args.softcap else None
    methods = [m for m in args.methods if softcap is None or m not in DENSE_DECODE or DENSE_DECODE[m].softcap]
    done = {}
    for r in read_csv_rows(results.path):
        if r.get("part") == "total" and r.get("median_ms"):
            best = r["min_ms"] if args.device == "cpu" and r.get("min_ms") else r["median_ms"]  # CPU: minima
            done[(r["shape"], r["dtype"], r["batch"], r["length"], r["density"], r["method"])] = float(best)
    for L in args.lengths:
        q, k, v = decode_inputs(shape, args.batch, L, args.torch_dtype, args.device, seed=L)
        base = dict(shape=shape["name"], dtype=args.dtype, batch=args.batch, length=L)
        dense_ms = {}
        runs = [(m, 1.0) for m in methods if m in DENSE_DECODE]
        runs += [(m, d) for d in args.densities for m in methods if m not in DENSE_DECODE]
        todo = []
        for name, density in runs:
            row = dict(base, density=density, method=name)
            key = tuple(str(row[c]) for c in ("shape", "dtype", "batch", "length", "density", "method"))
            if key in done:
                if name in DENSE_DECODE:
                    dense_ms[name] = done[key]
                continue
            todo.append((name, density, row))
        if args.device == "cpu":
            cpu_interleaved_steps(todo, q, k, v, config_for, scale, softcap, args, results, dense_ms)
            todo = []
        for name, density, row in tqdm(todo, desc=f"decode, {L} keys", leave=False):
            time_decode_step(name, q, k, v, config_for(density), row, scale, softcap, args, results, dense_ms)
        del q, k, v
        if args.device == "cuda":
            torch.cuda.empty_cache()


def cpu_interleaved_steps(todo, q, k, v, config_for, scale, softcap, args, results, dense_ms: dict) -> None:
    """CPU: the decode steps of one cache length interleaved (every entry once per round, --warmup + --repeats
    rounds), so that a change in the machine's load hits dense and sparse alike; rows as time_decode_step (medians
    in median_ms), the speed-ups from the minima."""
    import statistics
    import time

    entries = []  # (name, row, {part: fn})
    for name, density, row in todo:
        try:
            if name in DENSE_DECODE:
                attend = DENSE_DECODE[name].attend
                entries.append((name, row, {"total": lambda a=attend: a(q, k, v, scale, softcap)}))
            else:
                step = DecodeStep(name, q, k, v, config_for(density), scale, softcap)
                selection = step.select()
                entries.append((name, row, {"select": step.select, "attn": lambda s=step, sel=selection: s.attend(sel),
                                            "total": step}))
        except Exception as exc:
            print(f"  {name} at {row['length']} keys: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
            results.add(**row, part="error", note=f"{exc}"[:160])
    times = [{part: [] for part in parts} for _, _, parts in entries]
    for rnd in range(args.warmup + args.repeats):
        for i, (_, _, parts) in enumerate(entries):
            for part, fn in parts.items():
                t0 = time.perf_counter()
                fn()
                if rnd >= args.warmup:
                    times[i][part].append((time.perf_counter() - t0) * 1e3)
    best = {name: min(times[i]["total"]) for i, (name, _, _) in enumerate(entries) if name in DENSE_DECODE}
    for name, ms in best.items():
        dense_ms[name] = ms
    for i, (name, row, parts) in enumerate(entries):
        note = f"{results.note}; interleaved, {args.repeats} runs, speed-ups from the minima"
        for part in parts:
            ts = times[i][part]
            speed = {}
            if part != "select" and name not in DENSE_DECODE:
                speed = {column: dense_ms[dense] / min(ts) if dense in dense_ms else ""
                         for column, dense in SPEEDUP_COLUMNS.items()}
            results.add(**row, part=part, median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts), **speed,
                        note=note)


def time_decode_step(name: str, q, k, v, config, row: dict, scale, softcap, args, results,
                     dense_ms: dict) -> None:
    """Dense entry: part "total". Sparse: "select", "attn" (on that selection) and "total" (the step as
    run_method runs it, selection included), with the relative error of the step's output against the PyTorch
    executor on the same selection (GPU only: on the CPU they are the same path). Timing: utils.bench.latency.measure.
    dense_ms collects the dense medians for the speed-up columns. A failure gives an "error" row."""
    def timed(fn):
        return measure(fn, args.device, args.warmup, args.repeats)

    def speedups(ms):
        return {column: dense_ms[dense] / ms if dense in dense_ms else "" for column, dense in SPEEDUP_COLUMNS.items()}

    try:
        if name in DENSE_DECODE:
            attend = DENSE_DECODE[name].attend
            t = timed(lambda: attend(q, k, v, scale, softcap))
            dense_ms[name] = t["median_ms"]
            results.add(**row, part="total", **t)
            return
        step = DecodeStep(name, q, k, v, config, scale, softcap)
        selection = step.select()
        err = rel_err(step(), reference(q, k, v, selection, scale, softcap)) if args.device == "cuda" else ""
        t_sel = timed(step.select)
        t_att = timed(lambda: step.attend(selection))
        t_all = timed(step)
    except Exception as exc:  # a backend that cannot run this shape (cuDNN with one query), OOM
        print(f"  {name} at {row['length']} keys: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        results.add(**row, part="error", note=f"{exc}"[:160])
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return
    results.add(**row, part="select", **t_sel)
    results.add(**row, part="attn", **t_att, **speedups(t_att["median_ms"]))
    results.add(**row, part="total", **t_all, **speedups(t_all["median_ms"]), rel_err=err)

__all__ = ["DenseDecode", "DENSE_DECODE", "SPEEDUP_COLUMNS", "DECODE_DEFAULTS", "decode_method_names", "decode_inputs", "DecodeStep",
           "decode_mode"]
