"""One-layer CPU time of DHSA variants against dense SDPA and today's default, interleaved in one process (the
pass rule of RULE.md rounds 4-5): random q/k/v of a layer shape, selection included, min of --repeats rounds.

    OMP_NUM_THREADS=2 python notes/cpu_testbed/time_candidates.py --length 16384 \
        --variants "token_rescore=2,rescore_queries=8" "token_rescore=2,rescore_queries=16"
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from utils.bench.latency import random_qkv  # noqa: E402
from utils.bench.latency_methods import _table, layer_contexts  # noqa: E402
from utils.bench.testbed import parse_spec  # noqa: E402
from utils.config import SparseAttentionConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=16384)
p.add_argument("--shape", default="14x2x64")
p.add_argument("--variants", nargs="+", default=[])
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
Hq, Hkv, D = (int(x) for x in args.shape.split("x"))
shape = {"heads": Hq, "kv_heads": Hkv, "head_dim": D}
q, k, v = random_qkv(shape, 1, args.length, torch.float32, "cpu", seed=args.length)
table = _table()
sdpa, dhsa = table["sdpa"], table["dhsa"]
base = SparseAttentionConfig(method="dhsa", density=0.0625, min_budget=512)
configs = {"default": base}
for text in args.variants:
    configs[text] = base.replace(**parse_spec(f"dhsa[{text}]")[1])
runs = {"sdpa": lambda: sdpa.attend(q, k, v, None, None, None)}
for name, config in configs.items():
    first, later = layer_contexts()
    dhsa.select(q, k, v, config, first)  # boundaries once, as a patched model's first layer
    runs[name] = lambda c=config, lt=later: dhsa.attend(q, k, v, dhsa.select(q, k, v, c, lt()), None, None)
times = {name: [] for name in runs}
for _ in range(1 + args.repeats):  # the first round warms up
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
print(f"one layer {args.shape}, L={args.length}, {args.threads} threads, min of {args.repeats} (s; x default; "
      f"speed-up vs sdpa)")
for name, ts in times.items():
    best = min(ts[1:])
    print(f"  {name:45s} {best:8.3f}  x{best / min(times['default'][1:]):.2f}  "
          f"{min(times['sdpa'][1:]) / best:.2f}x  all: " + " ".join(f"{t:.2f}" for t in ts[1:]))
