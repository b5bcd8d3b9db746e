"""Scratch (device): pick the always-kept-keys / head-pooling defaults from the exploration JSONL files by a rule fixed
in advance: highest mean score (qwen mean and gemma mean averaged); within 0.5 points the earlier candidate wins
(cheaper or closer to the authors')."""
import json, sys
from collections import defaultdict
CANDIDATES = ["sl_mean", "sl_none", "sl2_none", "sl_max"]
FLAGS = {"sl_mean": "--sink-tokens 64 --local-tokens 128 --head-pooling mean",
         "sl_none": "--sink-tokens 64 --local-tokens 128 --head-pooling none",
         "sl2_none": "--sink-tokens 128 --local-tokens 256 --head-pooling none",
         "sl_max": "--sink-tokens 64 --local-tokens 128 --head-pooling max"}
scores = defaultdict(lambda: defaultdict(list))
for path in sys.argv[1:]:
    model = "gemma" if "gemma" in path else "qwen"
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        scores[r["variant"]][model].append(r["score"])
table = {}
for v, per in scores.items():
    means = {m: sum(x) / len(x) for m, x in per.items()}
    table[v] = means
    print(f"# {v}: " + ", ".join(f"{m} {x:.1f} (n={len(per[m])})" for m, x in means.items()), file=sys.stderr)
best, best_score = None, -1
for v in CANDIDATES:
    if v not in table:
        continue
    s = sum(table[v].values()) / len(table[v])
    if s > best_score + 0.5:
        best, best_score = v, s
print(f'CHOSEN="{best}"\nFLAGS="{FLAGS[best]}"')
