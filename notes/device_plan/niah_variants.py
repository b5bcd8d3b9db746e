"""Scratch (development only): NIAH for many DHSA config variants on one loaded model.

python .carry/jobs/niah_variants.py --model M --lengths 8192 16384 --depths 0 50 100 --variants V.json \
    --cases sf:default trondheim:.carry/news --out F.jsonl
A variant is {config overrides}; "method" picks the method (default dhsa); "prefill": "dense" runs every
multi-query call densely (so only decode steps are sparse).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import utils.patch as patch  # noqa: E402
from data.haystack import NEEDLE_SETS, Haystack, make_sample, read_essays, resolve_prompt_style, score_answer  # noqa: E402
from run_needle_in_haystack import generate_answer  # noqa: E402
from utils.attention import dense_attention  # noqa: E402
from utils.config import SparseAttentionConfig  # noqa: E402
from utils.models import load_model  # noqa: E402
from utils.patch import patch_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--lengths", nargs="+", type=int, required=True)
p.add_argument("--depths", nargs="+", type=float, default=[0, 25, 50, 75, 100])
p.add_argument("--density", type=float, default=0.0625)
p.add_argument("--min-budget", type=int, default=512)
p.add_argument("--variants", required=True, help="JSON file {name: {overrides}}")
p.add_argument("--only", nargs="*", default=None, help="variant names to run (default all)")
p.add_argument("--cases", nargs="+", default=["sf:default"], help="needle_set:haystack_dir")
p.add_argument("--max-new-tokens", type=int, default=32)
p.add_argument("--out", required=True)
args = p.parse_args()

model, tok = load_model(args.model, device="auto")
style = resolve_prompt_style(tok, "auto")
samples = []
for case in args.cases:
    needle_set, folder = case.split(":")
    hay = Haystack(read_essays(None if folder == "default" else folder), tok)
    needle, question, key = NEEDLE_SETS[needle_set]
    for n in args.lengths:
        for d in args.depths:
            samples.append((case, n, d, make_sample(hay, n, d, style, needle=needle, question=question),
                            (needle, key, question)))

real_run_method = patch.run_method
dense_prefill = {"on": False}


def run_method(method, q, k, v, config, context, **kw):
    if dense_prefill["on"] and q.shape[2] > 1:
        return dense_attention(q, k, v, scale=kw.get("scale"), softcap=kw.get("softcap"))
    return real_run_method(method, q, k, v, config, context, **kw)


patch.run_method = run_method
variants = json.loads(Path(args.variants).read_text())
done = set()
if Path(args.out).exists():
    for line in Path(args.out).read_text().splitlines():
        try:
            r = json.loads(line)
            done.add((r["variant"], r["case"], r["length"], r["depth"]))
        except ValueError:
            pass
for name, over in variants.items():
    if args.only and name not in args.only:
        continue
    over = dict(over)
    method = over.pop("method", "dhsa")
    dense_prefill["on"] = over.pop("prefill", "sparse") == "dense"
    if method == "dense":
        cfg = SparseAttentionConfig(method="dense", density=None)
    else:
        cfg = SparseAttentionConfig(method=method, density=args.density, min_budget=args.min_budget, **over)
    patch_model(model, config=cfg, tokenizer=tok)
    for case, n, d, s, (needle, key, question) in samples:
        if (name, case, n, d) in done:
            continue
        t0 = time.time()
        ans = generate_answer(model, tok, s.input_ids, args.max_new_tokens)
        sc = score_answer(ans, needle=needle, key_phrase=key, question=question)
        rec = dict(variant=name, case=case, length=n, depth=d, score=round(sc["score"], 1), exact=sc["exact_match"],
                   answer=ans, seconds=round(time.time() - t0, 2), overrides=variants[name])
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec)[:200], flush=True)
