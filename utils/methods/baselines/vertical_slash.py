"""MInference's Vertical-Slash pattern (Jiang et al., 2024; paper App. D, baseline 4).

What it keeps. Per query head, the last `last_q` queries (paper: 64) estimate the pattern from their true
attention (softmax of q . k / sqrt(D), causal): a key column's score is the attention it receives from them
(vertical lines), a diagonal's score is the attention along it, i.e. at distance s = q_pos - k_pos (slash
lines). Half of N_b goes to the best columns, half to the best distances, as in the paper (50% / 50%).
Always kept, as in MInference: the first 30 columns (attention sinks) and the 100 nearest diagonals (local
window), each capped at half of its share so that the estimate still chooses (the query's own diagonal is
always kept, so every query reads a key). Query i then reads the
vertical keys up to i and the keys i - s of the chosen distances: at most N_b keys. A query that sees at most
N_b keys reads all of them (so N_b >= L is dense attention).

Decode (Lq = 1). MInference itself decodes densely; here the pattern estimated at prefill is kept for the
layer (in `context.state`): the new token reads the prompt's vertical keys and the keys at the prefill's slash
distances from its own position (the nearest diagonals cover the generated tokens). Without a prefill in the
same context (e.g. a fresh context), the current query estimates the pattern itself.

Selection: one key list per query and query head (query_chunk = 1): B * Hq * Lq * N_b int64 indices.

    .venv/bin/python -m utils.methods.baselines.vertical_slash     # prints the pattern on 32 tokens
"""

from __future__ import annotations

import torch

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.common import per_query_selection
from utils.methods.baselines.oracle import last_query_attention

SINK_COLUMNS = 30       # MInference: the first columns are always vertical lines
LOCAL_DIAGONALS = 100   # MInference: the nearest diagonals are always slash lines


def estimate_pattern(q: torch.Tensor, k: torch.Tensor, num_vertical: int, num_slash: int, last_q: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical keys and slash distances from the last queries' attention.

    q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].
    Returns verticals [B, Hq, min(num_vertical, Lk)] (key indices) and slashes [B, Hq, min(num_slash, Lk)]
    (distances q_pos - k_pos), each ranked by the attention mass of the last min(last_q, Lq) queries.
    """
    Lk = k.shape[2]
    vertical, slash = last_query_attention(q, k, last_q, mean=False)
    vertical[..., :min(SINK_COLUMNS, num_vertical // 2)] = float("inf")
    # The query's own diagonal is always kept, so that every query reads at least one key.
    slash[..., :min(LOCAL_DIAGONALS, max(1, num_slash // 2))] = float("inf")
    verticals = torch.topk(vertical, min(num_vertical, Lk), dim=-1).indices
    slashes = torch.topk(slash, min(num_slash, Lk), dim=-1).indices
    return verticals, slashes


def vertical_slash_keys(q: torch.Tensor, k: torch.Tensor, budget: int, verticals: torch.Tensor,
                        slashes: torch.Tensor) -> Selection:
    """Selection of vertical keys + slash distances per query. q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D];
    verticals: [B, Hq, V]; slashes: [B, Hq, S] with V + S <= budget. key_index: [B, Hq, Lq, min(budget, Lk)]."""
    Lq, Lk = q.shape[2], k.shape[2]

    def candidates(start, end):
        q_pos = Lk - Lq + torch.arange(start, end, device=q.device)
        vertical = verticals[:, :, None, :].expand(-1, -1, end - start, -1)
        slash = q_pos[None, None, :, None] - slashes[:, :, None, :]
        return torch.cat([vertical, slash], dim=-1)

    return per_query_selection(q, k, budget, candidates)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    budget = config.resolve_budget(Lk)
    state = context.state.get("vertical_slash")
    usable = (Lq == 1 and state is not None and state["prompt_len"] < Lk and state["batch"] == B
              and state["verticals"].shape[-1] + state["slashes"].shape[-1] <= budget)
    if usable:
        verticals, slashes = state["verticals"], state["slashes"]
    else:
        verticals, slashes = estimate_pattern(q, k, budget // 2, budget - budget // 2, config.last_q)
        if Lq > 1:
            context.state["vertical_slash"] = {"verticals": verticals, "slashes": slashes, "prompt_len": Lk,
                                               "batch": B}
    return vertical_slash_keys(q, k, budget, verticals, slashes)


register(AttentionMethod("vertical_slash", "MInference Vertical-Slash: last 64 queries pick 50% vertical lines "
                                           "(key columns) + 50% slash lines (diagonals) per head", _select))

__all__ = ["estimate_pattern", "vertical_slash_keys", "SINK_COLUMNS", "LOCAL_DIAGONALS"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    budget = 10
    verticals, slashes = estimate_pattern(q, k, budget // 2, budget - budget // 2, last_q=8)
    print(f"vertical_slash: 32 tokens, budget {budget}, last_q 8; verticals {sorted(verticals[0, 0].tolist())}, "
          f"slash distances {sorted(slashes[0, 0].tolist())}  (row: position, keys, count)")
    print(ascii_mask(vertical_slash_keys(q, k, budget, verticals, slashes), 32, 32))
