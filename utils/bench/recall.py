"""Attention recall: how much of a query's true attention the keys a sparse method reads cover (paper Fig. 3, Fig. 12,
App. C eq. 10). Read by run_attention_recall.py (the sweep) and visualize_attention_masks.py (the kept patterns).

For each scored query, against its true attention p (softmax of the scaled scores, causal, as the layer computes it):
  mass_recall   sum of p over the keys read: the share of the attention mass the method keeps;
  topk_overlap  |read ∩ TopK| / |TopK| with K = the budget N: eq. 10 recall against the oracle important set;
  keys_read     the number of keys the query really reads (below N when a method leaves budget unused).
Scores and masks are built for the scored queries only: memory O(num_queries x L) per layer, never O(L^2).

    logits, probs = true_attention(q_last, k)                # [B, Hq, n, L]
    keys, valid = read_keys(selection, rows)                 # [B, Hs, n, K]: what a method's Selection reads
    recall_scores(logits, probs, keys, valid, topk_thresholds(logits, [N])[N], N)["mass_recall"]   # [B, Hq, n]
"""

from __future__ import annotations

import torch

from utils.methods.baselines.oracle import query_key_scores
from utils.methods import METHODS, LayerContext
from utils.selection import block_selection_to_tokens

METRICS = ("mass_recall", "topk_overlap")


def true_attention(q: torch.Tensor, k: torch.Tensor, scaling: float | None = None,
                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and weights of causal attention. q: [B, Hq, n, D] at positions Lk - n .. Lk - 1, k: [B, Hkv, Lk, D]
    -> (logits, probs), both [B, Hq, n, Lk] fp32; future keys have logit -inf and weight 0 (GQA without
    repeating K). Rankings use the logits: weights may underflow to equal zeros, logits do not."""
    n, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    logits = query_key_scores(q, k) * (D ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    q_pos = Lk - n + torch.arange(n, device=q.device)
    logits = logits.masked_fill(torch.arange(Lk, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
    return logits, torch.softmax(logits, dim=-1)


def topk_thresholds(logits: torch.Tensor, kept_keys: list[int]) -> dict[int, torch.Tensor]:
    """{K: the K-th largest logit of each query [B, Hq, n]} (-inf when a query sees fewer than K keys):
    key j is among a query's top-K keys iff its logit is >= the threshold."""
    top = torch.topk(logits, min(max(kept_keys), logits.shape[-1]), dim=-1).values
    return {K: top[..., min(K, top.shape[-1]) - 1] for K in kept_keys}


def read_keys(selection, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys that queries `rows` (indices into the selection's queries) read: keys [B, Hs, n, K] and a mask
    `valid` of the same shape (listed for the query's tile, causal, and allowed by the per-query rule)."""
    if getattr(selection, "block_size", None):  # block form (a GPU's FlexPrefill / XAttention): key positions
        selection = block_selection_to_tokens(selection, selection.q_offset + int(rows.max()) + 1)
    keys = selection.key_index[:, :, rows // selection.query_chunk]           # [B, Hs, n, K]
    q_pos = selection.q_offset + rows
    valid = (keys >= 0) & (keys <= q_pos[:, None])
    if selection.keep is not None:  # each query as a tile of one: q_pos [n, 1, 1], k_pos [B, Hs, n, 1, K]
        valid &= selection.keep(q_pos[:, None, None], keys[:, :, :, None, :]).squeeze(-2)
    return keys, valid


def recall_scores(logits, probs, keys, valid, threshold, top_k: int) -> dict[str, torch.Tensor]:
    """Per-query recall of the keys a method reads, for queries at positions Lk - n .. Lk - 1.

    logits, probs: [B, Hq, n, Lk] (true_attention); keys, valid: [B, Hs, n, K] (read_keys; Hs = Hkv or Hq);
    threshold: [B, Hq, n], the top_k-th largest logit (topk_thresholds). Returns tensors [B, Hq, n]:
    mass_recall (attention weight on the read keys), topk_overlap (|read ∩ top-K| / |top-K|, the top-K of a
    query that sees fewer than K keys being all of them) and keys_read.
    """
    B, Hq, n, Lk = probs.shape
    Hs, K = keys.shape[1], keys.shape[-1]
    G = Hq // Hs
    index = keys.clamp(min=0)[:, :, None].expand(B, Hs, G, n, K)
    valid = valid[:, :, None].expand(B, Hs, G, n, K)
    mass = (probs.view(B, Hs, G, n, Lk).gather(-1, index) * valid).sum(-1)
    in_top = logits.view(B, Hs, G, n, Lk).gather(-1, index) >= threshold.view(B, Hs, G, n)[..., None]
    visible = Lk - n + torch.arange(1, n + 1, device=probs.device)
    top_size = torch.clamp(visible, max=top_k)
    overlap = (in_top & valid).sum(-1) / top_size
    return {"mass_recall": mass.view(B, Hq, n), "topk_overlap": overlap.view(B, Hq, n),
            "keys_read": valid.sum(-1).view(B, Hq, n).float()}


def dense_tail_rows(selection, first_row: int, q_offset: int, scores: dict[str, torch.Tensor]) -> None:
    """Set, in place, the recall of the queries that read every key (rows >= selection.dense_from, DHSA's dense
    tail) in `scores` of queries first_row .. first_row + n - 1 (recall_scores): they keep all the mass."""
    if selection.dense_from is None:
        return
    n = scores["mass_recall"].shape[-1]
    rows = first_row + torch.arange(n, device=scores["mass_recall"].device)
    dense = rows >= selection.dense_from
    if bool(dense.any()):
        scores["mass_recall"][..., dense] = 1.0
        scores["topk_overlap"][..., dense] = 1.0
        scores["keys_read"][..., dense] = (q_offset + rows[dense] + 1).float()


def kept_mask(selection, num_queries: int, num_keys: int, num_heads: int) -> torch.Tensor:
    """Boolean [B, Hq, Lq, Lk] of the (query, key) pairs a selection reads, per query head (small L: plots)."""
    if getattr(selection, "block_size", None):  # block form: key positions first
        selection = block_selection_to_tokens(selection, num_keys)
    mask = selection.mask(num_queries, num_keys)
    return mask.repeat_interleave(num_heads // mask.shape[1], dim=1) if mask.shape[1] != num_heads else mask


def layer_recall(q, k, options, methods, kept_keys, num_queries, base_config, layer, shared, boundary_source,
                 query_step: int = 256):
    """Recall rows for one layer: [{"method", "kept_keys", "mass_recall", "topk_overlap", "keys_read"}].

    q: [1, Hq, n, D] the last n queries (n >= num_queries, starting on a tile boundary); k: [1, Hkv, L, D].
    shared: {method: that method's LayerContext.shared} across the layers of one forward.
    The true attention is full causal attention (layers with a sliding window are scored against it too).
    Scores are gathered for `query_step` queries at a time: memory O(num_queries x L + query_step x N).
    """
    n, L = q.shape[2], k.shape[2]
    logits, probs = true_attention(q[:, :, n - num_queries:], k, options.get("scaling"), options.get("softcap"))
    thresholds = topk_thresholds(logits, kept_keys)
    rows = []
    for N in kept_keys:
        config = base_config.replace(budget=N, density=None, min_budget=0)
        for name in methods:
            context = LayerContext(layer, {}, shared.setdefault(name, {}), boundary_source)
            selection = METHODS[name].select(q, k, config.replace(method=name), context)
            totals = dict.fromkeys(("mass_recall", "topk_overlap", "keys_read"), 0.0)
            for start in range(0, num_queries, query_step):
                part = slice(start, min(num_queries, start + query_step))
                keys, valid = read_keys(selection, torch.arange(n - num_queries + part.start,
                                                                n - num_queries + part.stop, device=q.device))
                scores = recall_scores(logits[:, :, part], probs[:, :, part], keys, valid,
                                       thresholds[N][:, :, part], N)
                dense_tail_rows(selection, n - num_queries + part.start, L - n, scores)
                for key in totals:
                    totals[key] += scores[key].sum().item()
            count = q.shape[0] * q.shape[1] * num_queries
            rows.append({"method": name, "kept_keys": N, **{key: v / count for key, v in totals.items()}})
    return rows
