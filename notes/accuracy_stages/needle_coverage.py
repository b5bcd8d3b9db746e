"""Diagnostic (CPU or GPU): how much of the last query tile's attention on the needle survives DHSA's selection?

One dense forward of a needle prompt, with an attention hook that keeps every layer's post-RoPE queries of the last
tile and all keys. The production selection (`utils.methods.dhsa.select.dhsa_select`) then runs on those queries for each variant
of the options; per layer and query head we measure, over the tile's queries, the dense attention mass on the needle
tokens and the part of it that the kept keys hold. A head "needs" the needle when its mass on it is >= --mass.
Reported per variant: needle mass kept (summed over the needing heads, relative to dense), the number of needing heads
that keep >= half of their needle mass, and the total attention mass kept over all heads (attention recall).

    python notes/accuracy_stages/needle_coverage.py --model qwen2.5-coder-0.5b-instruct --length 8192 --depth 50 \
        --haystack-dir ../shared/data/PaulGrahamEssays --out cov.jsonl
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from data.haystack import NEEDLE_SETS, Haystack, make_sample, read_essays, resolve_prompt_style  # noqa: E402
from utils.methods.dhsa.boundaries import fixed_size_ends  # noqa: E402
from utils.config import SparseAttentionConfig  # noqa: E402
from utils.methods.dhsa.select import dhsa_select  # noqa: E402
from utils.models import load_model  # noqa: E402

VARIANTS = {"base": {}, "chunk8": {"chunk_size": 8}, "rescore2": {"token_rescore": 2.0},
            "rescore4": {"token_rescore": 4.0}, "exact_tail": {"exact_tail": 64}, "exact_tail_rescore2": {"exact_tail": 64, "token_rescore": 2.0}}

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
p.add_argument("--length", type=int, default=8192)
p.add_argument("--depths", type=float, nargs="+", default=[50])
p.add_argument("--needle-set", default="sf")
p.add_argument("--haystack-dir", default=None)
p.add_argument("--density", type=float, default=0.0625)
p.add_argument("--min-budget", type=int, default=512)
p.add_argument("--mass", type=float, default=0.05)
p.add_argument("--out", default=None)
args = p.parse_args()

model, tok = load_model(args.model, device="auto")
needle, question, _ = NEEDLE_SETS[args.needle_set]
hay = Haystack(read_essays(args.haystack_dir), tok)
T = SparseAttentionConfig.query_chunk
captured = {}


def capture(module, query, key, value, attention_mask, **kw):
    captured[module.layer_idx] = (query[:, :, -T:].float().cpu(), key.float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("capture", capture)
model.set_attn_implementation("capture")
piece = tok.encode(needle, add_special_tokens=False)[2:-2]  # the needle's middle tokens (its ends may merge)
for depth in args.depths:
    sample = make_sample(hay, args.length, depth, resolve_prompt_style(tok, "auto"), needle=needle, question=question)
    ids = sample.input_ids
    L = len(ids)
    at = next(i for i in range(L - len(piece)) if ids[i:i + len(piece)] == piece)
    lo, hi = at - 2, at + len(piece) + 2
    captured.clear()
    with torch.inference_mode():
        model(torch.tensor([ids], device=model.device))
    budget = max(math.ceil(args.density * L), args.min_budget)
    totals = {v: {"needle_kept": 0.0, "needle": 0.0, "heads_half": 0, "heads": 0, "recall": 0.0, "n": 0}
              for v in VARIANTS}
    for layer, (q, k) in sorted(captured.items()):
        Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
        G = Hq // Hkv
        scale = getattr(model.model.layers[layer].self_attn, "scaling", D ** -0.5)
        logits = torch.einsum("bhtd,bhld->bhtl", q, k.repeat_interleave(G, 1))[0] * scale
        causal = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # [Hq, T, L]
        needle_mass = probs[:, :, lo:hi].sum(-1).mean(-1)  # per head
        for name, over in VARIANTS.items():
            config = SparseAttentionConfig(method="dhsa", density=args.density, min_budget=args.min_budget, **over)
            ends = [fixed_size_ends(L, config.chunk_size)]
            sel = dhsa_select(q, k, budget=budget, boundaries=ends, options=config.dhsa_options())
            idx = sel.key_index[0, :, -1]  # [Hq, K]: the selection of the last tile
            keep = torch.zeros(Hq, L, dtype=torch.bool)
            for h in range(Hq):
                keep[h, idx[h][idx[h] >= 0]] = True
            kept_mass = (probs * keep[:, None]).sum(-1).mean(-1)  # per head
            kept_needle = (probs[:, :, lo:hi] * keep[:, None, lo:hi]).sum(-1).mean(-1)
            t = totals[name]
            t["recall"] += float(kept_mass.sum())
            t["n"] += Hq
            for h in range(Hq):
                if needle_mass[h] >= args.mass:
                    t["needle"] += float(needle_mass[h])
                    t["needle_kept"] += float(kept_needle[h])
                    t["heads"] += 1
                    t["heads_half"] += int(kept_needle[h] >= 0.5 * needle_mass[h])
    for name, t in totals.items():
        row = {"model": Path(args.model).name, "needle_set": args.needle_set, "length": L, "depth": depth,
               "budget": budget, "variant": name, "needle_mass_kept": round(t["needle_kept"] / max(t["needle"], 1e-9), 4),
               "heads_keeping_half": f"{t['heads_half']}/{t['heads']}", "attention_recall": round(t["recall"] / t["n"], 4)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
