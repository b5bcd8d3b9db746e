"""Scratch (device): pick DHSA's token-rescoring default from the exploration JSONL files by a rule fixed before the
run: exact needles summed over Qwen2.5-1.5B and Gemma-3 (30 cases each); candidates in order of selection cost;
a later (costlier) candidate is chosen only if it beats the best so far by >= 2 exact needles."""
import json, sys
from collections import defaultdict
CANDIDATES = ["base", "tail64", "tail256", "c8", "tail64_r2", "all4"]
FLAGS = {"base": "", "tail64": "--exact-tail 64", "tail256": "--exact-tail 256", "c8": "--chunk-size 8",
         "tail64_r2": "--exact-tail 64 --token-rescore 2", "all4": "--token-rescore 4"}
exact = defaultdict(lambda: defaultdict(int)); n = defaultdict(lambda: defaultdict(int))
for path in sys.argv[1:]:
    model = "gemma" if "gemma" in path else "qwen"
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        exact[r["variant"]][model] += bool(r["exact"]); n[r["variant"]][model] += 1
for v in exact:
    print(f"# {v}: " + ", ".join(f"{m} {exact[v][m]}/{n[v][m]}" for m in sorted(exact[v])), file=sys.stderr)
best, best_total = None, -1
for v in CANDIDATES:
    if n[v]["qwen"] != 30 or n[v]["gemma"] != 30:
        print(f"# {v}: incomplete, skipped", file=sys.stderr); continue
    total = exact[v]["qwen"] + exact[v]["gemma"]
    if best is None or total >= best_total + 2:
        best, best_total = v, total
print(f'CHOSEN="{best}"\nFLAGS="{FLAGS[best]}"')
