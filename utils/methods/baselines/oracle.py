"""Oracle top-K: each query keeps exactly its N_b highest-scoring keys (an upper bound, not a practical method).

What it keeps. For every query head and every query, the true scores q . k over the keys it can see
causally are ranked and the N_b best kept (all of them when it sees fewer). The ranking is that of the
attention weights (softmax, scaling and soft-capping are monotonic), so no selection of N_b keys per query
holds more attention mass: this bounds the recall of every method at the same budget (paper App. C, Fig. 12).

Cost. It needs the full scores, so it is O(L^2 D) like dense attention; they are computed a bounded number of
queries at a time, never as an L x L tensor. The selection itself is one list per query and query head:
B * Hq * Lq * N_b int64 indices. Decode (Lq = 1): the current query's top-N_b keys.

    .venv/bin/python -m utils.methods.baselines.oracle     # prints the pattern on 24 tokens
"""

from __future__ import annotations

import torch

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.common import per_query_selection


def query_key_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Raw scores q . k per query head without repeating K. q: [B, Hq, n, D], k: [B, Hkv, Lk, D] -> [B, Hq, n, Lk]."""
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    scores = torch.matmul(q.reshape(B, Hkv, (Hq // Hkv) * n, D).float(), k.float().transpose(-1, -2))
    return scores.view(B, Hq, n, k.shape[2])


def last_query_attention(q: torch.Tensor, k: torch.Tensor, num_last: int, mean: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash attention of the last `num_last` queries (true attention: causal softmax of q . k / sqrt(D)).

    q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D]. Returns vertical [B, Hq, Lk] (attention
    each key gets) and slash [B, Hq, Lk] (attention at each distance q_pos - k_pos), averaged over the queries
    (mean=True: both sum to 1, FlexPrefill's distributions) or summed (mean=False: MInference's ranking).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, m = Hq // Hkv, min(num_last, Lq)
    q_pos = Lk - m + torch.arange(m, device=q.device)
    distance = q_pos[:, None] - torch.arange(Lk, device=q.device)[None, :]            # [m, Lk]
    vertical = torch.empty(B, Hq, Lk, device=q.device)
    slash = torch.zeros(B, Hq, Lk, device=q.device)
    index = distance.clamp(min=0).reshape(1, 1, m * Lk).expand(B, G, m * Lk)
    for h in range(Hkv):  # one KV group at a time bounds the [B, G, m, Lk] probabilities
        heads = slice(h * G, (h + 1) * G)
        scores = query_key_scores(q[:, heads, Lq - m:], k[:, h:h + 1]) * D ** -0.5
        probs = torch.softmax(scores.masked_fill(distance < 0, float("-inf")), dim=-1)
        if mean:
            probs = probs / m
        vertical[:, heads] = probs.sum(dim=2)
        slash[:, heads] = slash[:, heads].scatter_add(-1, index, probs.reshape(B, G, m * Lk))
    return vertical, slash


def oracle_topk_select(q: torch.Tensor, k: torch.Tensor, budget: int) -> Selection:
    """Per-query true top-`budget` keys. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Returns a Selection with key_index [B, Hq, Lq, min(budget, Lk)] and query_chunk = 1.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    width = min(budget, Lk)
    key_pos = torch.arange(Lk, device=q.device)

    def candidates(start, end):
        scores = query_key_scores(q[:, :, start:end], k)
        q_pos = Lk - Lq + torch.arange(start, end, device=q.device)[:, None]
        scores = scores.masked_fill(key_pos[None, :] > q_pos, float("-inf"))
        top, index = torch.topk(scores, width, dim=-1, sorted=False)
        return torch.where(top == float("-inf"), -1, index)

    return per_query_selection(q, k, budget, candidates, distinct=True)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    return oracle_topk_select(q, k, config.resolve_budget(k.shape[2]))


register(AttentionMethod("oracle_topk", "Oracle top-K: each query's N_b highest true scores (upper bound, O(L^2))",
                         _select))

__all__ = ["oracle_topk_select", "query_key_scores", "last_query_attention"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 24, 8), torch.randn(1, 1, 24, 8)
    print("oracle_topk: 24 tokens, budget 6  (row: position, keys, count)")
    print(ascii_mask(oracle_topk_select(q, k, budget=6), 24, 24))
