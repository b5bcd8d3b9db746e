"""The CPU sparse attention of two versions of utils/attention.py on one DHSA selection, interleaved in one process:
random q/k/v of a layer shape, the selection made once, min of --repeats rounds, and the largest difference of the
two outputs (a speed-up must not change them).

    git show <commit>:utils/attention.py > /tmp/attention_before.py
    python notes/cpu_testbed/ab_attention.py --before /tmp/attention_before.py --length 32768 --repeats 3
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import utils.attention as current  # noqa: E402
from utils.config import SparseAttentionConfig  # noqa: E402
from utils.methods.dhsa.boundaries import FixedSizeBoundaries  # noqa: E402
from utils.methods.dhsa.select import dhsa_select  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--before", type=Path, required=True, help="the other version of utils/attention.py")
p.add_argument("--length", type=int, default=8192)
p.add_argument("--shape", default="14x2x64", help="query heads x KV heads x head dim")
p.add_argument("--density", type=float, default=0.0625)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
if not args.before.is_file():
    sys.exit(f"--before {args.before}: no such file (write one with git show <commit>:utils/attention.py > FILE)")
torch.set_num_threads(args.threads)
spec = importlib.util.spec_from_file_location("attention_before", args.before)
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

Hq, Hkv, D = (int(x) for x in args.shape.split("x"))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, args.length, D, generator=g) for h in (Hq, Hkv, Hkv))
config = SparseAttentionConfig(method="dhsa", density=args.density)
ends = FixedSizeBoundaries.from_config(config)(k, config.num_chunks(args.length))
selection = dhsa_select(q, k, budget=config.resolve_budget(args.length), boundaries=ends,
                        options=config.dhsa_options())
diff = (before.sparse_attention(q, k, v, selection) - current.sparse_attention(q, k, v, selection)).abs().max()
times = {"before": [], "now": []}
for _ in range(args.repeats):
    for name, module in (("before", before), ("now", current)):
        t0 = time.perf_counter()
        module.sparse_attention(q, k, v, selection)
        times[name].append(time.perf_counter() - t0)
b, n = min(times["before"]) * 1e3, min(times["now"]) * 1e3
print(f"{args.shape} at {args.length}: before {b:.0f} ms, now {n:.0f} ms (minima of {args.repeats}): {b / n:.3f}x; "
      f"max output difference {diff.item():.2e}")
