"""Timing and result rows of the latency benchmark (run_latency_test.py): CUDA-event timing, the relative error of
an output, random inputs of a layer shape, and the CSV that rows are appended to as they are measured.

Timing: warm-up calls first, then the median (and min/max) of `repeats` calls; on the GPU each call is bracketed
by CUDA events and the host waits for the end event, on the CPU by perf_counter.
"""

from __future__ import annotations

import contextlib
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from utils.runs.generation import sync
from utils.runs import append_csv

COLUMNS = ("mode", "device", "shape", "dtype", "batch", "length", "density", "decode", "method", "part", "median_ms",
           "min_ms", "max_ms", "speedup_vs_flash", "speedup_vs_cudnn", "speedup_vs_dense", "rel_err",
           "peak_gb", "note")


def device_name(device: str) -> str:
    """GPU name, or the CPU's model name (/proc/cpuinfo on Linux, else the platform's), with underscores: it names
    the CSV file, so that runs on different CPUs behind the same box never share one."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_model() or platform.processor() or platform.machine() or "cpu"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


_CPUINFO = "/proc/cpuinfo"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo without (R), (TM), "CPU" and the clock; "" where there is none. A
    name without a model number (a VM's "AMD EPYC", which hid a Zen 3 and a Zen 4 host on this box) gets the CPU
    family and model numbers, e.g. "AMD EPYC f25m17"."""
    fields = {}
    try:
        with open(_CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        return ""
    name = re.sub(r"\(R\)|\(TM\)|\bCPU\b|@.*", "", fields.get("model name", "")).strip()
    if name and not re.search(r"\d", name) and "cpu family" in fields and "model" in fields:
        name += f" f{fields['cpu family']}m{fields['model']}"
    return name


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
    """||out - ref|| / ||ref|| in float64; nan when out has a non-finite value."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def random_qkv(shape: dict, batch: int, length: int, dtype, device: str, seed: int):
    """Standard normal q [B, heads, L, D], k and v [B, kv_heads, L, D] for a layer shape (ModelSpec.layer_shape)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, shape["heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, shape["kv_heads"], length, shape["head_dim"], generator=g, device=device, dtype=dtype)
    return q, k, v


class Results:
    """Rows appended to <out>/<mode>_<device>.csv as they are measured (utils/runs/records.py append_csv: one line per row,
    crash-safe); prints a table at the end. `decode`: the config's decode protocol, recorded in every row."""

    def __init__(self, out_dir: Path, mode: str, device: str, note: str, decode: str = ""):
        self.path = out_dir / f"{mode}_{device_name(device)}.csv"
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


@contextlib.contextmanager
def attention_timer(implementation: str):
    """Context that times the model's attention function (transformers' AttentionInterface entry
    `implementation`, e.g. "sdpa" or a registry method patched in by utils/patch.py): yields {"seconds": ...}, the
    wall time spent inside it (q/k/v projections, RoPE and the output projection are not in it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    table = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = table[implementation]
    clock = {"seconds": 0.0}

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        clock["seconds"] += time.perf_counter() - t0
        return out

    table[implementation] = timed
    try:
        yield clock
    finally:
        table[implementation] = original


def sdpa_backend(name: str | None):
    """Context pinning torch SDPA to one backend ("flash", "cudnn", "math"); None pins nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name is None:
        return contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


__all__ = ["COLUMNS", "device_name", "sync", "measure", "attention_timer", "rel_err", "random_qkv", "Results", "sdpa_backend"]
