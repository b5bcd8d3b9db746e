"""Quest (Tang et al., 2024; paper App. D, baseline 8): query-aware page selection at decode time.

What it keeps. The keys are cut into pages of `page_size` tokens (Quest: 16) and each page remembers, per
channel d, the smallest and largest key value (min_d, max_d). A query q bounds its score on any key of the
page from above by  sum_d max(q_d * min_d, q_d * max_d)  and keeps the floor(N_b / page_size) pages with the
highest bounds among those it can see (all of its visible keys when it sees at most N_b). Selection is per
query head, as in Quest. With N_b < page_size, pages of N_b tokens are used so no query reads more than N_b.

Prefill is dense (registered with `dense_prefill=True`, as in the paper: Quest only compresses decoding).
Decode (Lq = 1): the current token's query ranks the pages of the whole cache, its own partly filled last
page included, and reads the chosen pages' keys up to itself. For analysis (recall plots, tests), `select`
also takes several queries: each query is treated as if it were the decode step at its position.

    .venv/bin/python -m utils.methods.baselines.quest     # prints the per-query pattern on 32 tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.common import per_query_selection


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel minima and maxima of the keys. k: [B, Hkv, L, D] -> two [B, Hkv, ceil(L / page), D] fp32
    (the last page over its real keys only)."""
    B, H, L, D = k.shape
    n = math.ceil(L / page)
    pad = n * page - L
    lo = F.pad(k.float(), (0, 0, 0, pad), value=float("inf")).view(B, H, n, page, D).amin(dim=3)
    hi = F.pad(k.float(), (0, 0, 0, pad), value=float("-inf")).view(B, H, n, page, D).amax(dim=3)
    return lo, hi


def quest_select(q: torch.Tensor, k: torch.Tensor, budget: int, page_size: int = 16) -> Selection:
    """Top pages per query by Quest's upper bound. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1;
    k: [B, Hkv, Lk, D]. Returns a Selection with key_index [B, Hq, Lq, min(budget, Lk)], query_chunk = 1."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    page = min(page_size, budget, Lk)
    n_pages = math.ceil(Lk / page)
    n_keep = min(budget // page, n_pages)
    lo, hi = page_bounds(k, page)
    G = Hq // Hkv
    page_start = torch.arange(n_pages, device=q.device) * page

    def candidates(start, end):
        n = end - start
        qs = q[:, :, start:end].float().reshape(B, Hkv, G * n, D)
        # max(q_d * min_d, q_d * max_d) = relu(q_d) * max_d + min(q_d, 0) * min_d, summed over d: two matmuls.
        bound = qs.clamp(min=0) @ hi.transpose(-1, -2) + qs.clamp(max=0) @ lo.transpose(-1, -2)
        bound = bound.view(B, Hq, n, n_pages)
        q_pos = Lk - Lq + torch.arange(start, end, device=q.device)[:, None]
        bound = bound.masked_fill(page_start[None, :] > q_pos, float("-inf"))
        top, chosen = torch.topk(bound, n_keep, dim=-1, sorted=False)
        keys = (chosen[..., None] * page + torch.arange(page, device=q.device)).flatten(-2)
        valid = (top != float("-inf")).repeat_interleave(page, dim=-1) & (keys < Lk)
        return torch.where(valid, keys, -1)

    return per_query_selection(q, k, budget, candidates, distinct=True)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    return quest_select(q, k, config.resolve_budget(k.shape[2]), config.page_size)


register(AttentionMethod("quest", "Quest: decode-time top pages by per-page min/max key bounds (prefill dense)",
                         _select, dense_prefill=True))

__all__ = ["quest_select", "page_bounds"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    print("quest: 32 tokens, pages of 4, budget 12 (3 pages); each row as its own decode step")
    print(ascii_mask(quest_select(q, k, budget=12, page_size=4), 32, 32))
