"""Diagnostic (CPU or GPU): does DHSA's chunk scoring rank the needle for the question tile?

One dense forward of a needle prompt with hooks that keep every layer's post-RoPE queries of the last tile and all
keys. For each layer and query head: the dense attention mass of the last tile's queries on the needle tokens, and,
under several chunk-scoring variants, the rank of the best needle chunk among the chunks the tile may see. A head
"needs" the needle when its dense mass on it is >= --mass; the table gives, per variant, the share of those heads
whose needle chunk ranks within the chunk budget (N_b / chunk size).

    python notes/accuracy_stages/needle_rank.py --model qwen2.5-coder-0.5b-instruct --length 8192 --depth 50
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from data.haystack import NEEDLE_SETS, Haystack, make_sample, read_essays, resolve_prompt_style  # noqa: E402
from utils.methods.dhsa.boundaries import fixed_size_ends  # noqa: E402
from utils.methods.dhsa.scores import chunk_vectors, tile_key_means  # noqa: E402
from utils.models import load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
p.add_argument("--length", type=int, default=8192)
p.add_argument("--depth", type=float, default=50)
p.add_argument("--needle-set", default="sf")
p.add_argument("--haystack-dir", default=None)
p.add_argument("--tile", type=int, default=64)
p.add_argument("--density", type=float, default=0.0625)
p.add_argument("--min-budget", type=int, default=512)
p.add_argument("--mass", type=float, default=0.05)
p.add_argument("--out", default=None)
args = p.parse_args()

model, tok = load_model(args.model, device="auto")
needle, question, _ = NEEDLE_SETS[args.needle_set]
hay = Haystack(read_essays(args.haystack_dir), tok)
sample = make_sample(hay, args.length, args.depth, resolve_prompt_style(tok, "auto"), needle=needle, question=question)
ids = sample.input_ids
L = len(ids)
# needle token span: find the needle's middle tokens in the prompt (its ends may merge with the newlines around it)
piece = tok.encode(needle, add_special_tokens=False)[2:-2]
at = next(i for i in range(L - len(piece)) if ids[i:i + len(piece)] == piece)
lo, hi = at - 2, at + len(piece) + 2

captured = {}


from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402


def capture(module, query, key, value, attention_mask, **kw):
    captured[module.layer_idx] = (query[0, :, -args.tile:].float().cpu(), key[0].float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("capture", capture)
model.set_attn_implementation("capture")
with torch.inference_mode():
    model(torch.tensor([ids], device=model.device))

budget = max(math.ceil(args.density * L), args.min_budget)
rows = []
for layer, (q, k) in sorted(captured.items()):
    Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
    G = Hq // Hkv
    kk = k.repeat_interleave(G, 0)
    scores = torch.einsum("htd,hld->htl", q, kk) / math.sqrt(D)
    causal = torch.arange(L)[None, :] <= torch.arange(L - args.tile, L)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    mass = probs[:, :, lo:hi].sum(-1).mean(-1)  # per head, mean over the tile's queries
    for cs in (8, 16, 32):
        ends = fixed_size_ends(L, cs)
        nchunks = budget // cs
        tile_end = torch.tensor([L])
        for variant in ("max", "max_lse", "mean"):
            ck = chunk_vectors(k, ends, True)  # [Hkv, Nc, D]
            km, w = tile_key_means(ck, ends, tile_end, True)
            s = torch.einsum("htd,hcd->htc", q, ck.repeat_interleave(G, 0))
            s = s - (q * km.repeat_interleave(G, 0)).sum(-1, keepdim=True) * w  # centring
            if variant == "max_lse":
                s = s / math.sqrt(D)
                s = s - torch.logsumexp(s, -1, keepdim=True)
            tile_score = s.amax(1) if variant != "mean" else s.mean(1)
            needle_chunks = torch.searchsorted(ends, torch.arange(lo, hi), right=True).unique()
            for h in range(Hq):
                best = tile_score[h, needle_chunks].max()
                rank = int((tile_score[h] > best).sum())
                rows.append(dict(layer=layer, head=h, mass=round(float(mass[h]), 4), chunk=cs, variant=variant,
                                 rank=rank, budget_chunks=nchunks))
need = [r for r in rows if r["mass"] >= args.mass]
print(f"L={L} budget={budget} needle tokens {lo}..{hi} heads needing the needle (mass >= {args.mass}): "
      f"{len({(r['layer'], r['head']) for r in need})}")
for cs in (8, 16, 32):
    for variant in ("max", "max_lse", "mean"):
        sel = [r for r in need if r["chunk"] == cs and r["variant"] == variant]
        hit = sum(r["rank"] < r["budget_chunks"] for r in sel)
        print(f"chunk {cs:2d} {variant:8s}: needle chunk within budget for {hit}/{len(sel)} needing heads")
if args.out:
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
