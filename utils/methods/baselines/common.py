"""Helpers shared by the baselines: packing candidate keys into `Selection` rows, per-query selections built in
bounded steps, and a text picture of a selection for the modules' demos.

Conventions (utils/attention.py): a selection row lists, ascending, the keys a query tile may read, -1 marks an
unused slot at the end of the row. Queries sit at positions `Lk - Lq .. Lk - 1`.
"""

from __future__ import annotations

import torch

from utils.selection import Selection

_BUILD_ELEMENTS = 1 << 24  # elements of the temporaries of one step when building per-query selections
_NONE = torch.iinfo(torch.long).max


def pack_keys(candidates: torch.Tensor, width: int, distinct: bool = False) -> torch.Tensor:
    """Candidate keys [..., C] (-1 = none, duplicates allowed) -> [..., width] ascending distinct keys, -1 after.

    distinct=True skips removing duplicates (for candidates known to be distinct). Raises ValueError if a row
    holds more than `width` distinct keys (a method that would break its budget).
    """
    keys = torch.where(candidates < 0, _NONE, candidates).sort(dim=-1).values
    if not distinct:
        repeated = torch.zeros_like(keys, dtype=torch.bool)
        repeated[..., 1:] = keys[..., 1:] == keys[..., :-1]
        keys = torch.where(repeated, _NONE, keys).sort(dim=-1).values
    if keys.shape[-1] > width:
        if (keys[..., width:] != _NONE).any():
            raise ValueError(f"a selection row has more than {width} distinct keys")
        keys = keys[..., :width]
    elif keys.shape[-1] < width:
        pad = torch.full(keys.shape[:-1] + (width - keys.shape[-1],), _NONE, dtype=keys.dtype, device=keys.device)
        keys = torch.cat([keys, pad], dim=-1)
    return torch.where(keys == _NONE, -1, keys)


def per_query_selection(q: torch.Tensor, k: torch.Tensor, budget: int, candidates, distinct: bool = False
                        ) -> Selection:
    """A selection with one key list per query and per query head (query_chunk = 1, Hs = Hq).

    q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D]. `candidates(start, end)` returns candidate keys [B, Hq, end - start, C]
    (-1 = none, duplicates allowed unless distinct=True) for queries start..end-1 (indices into q); keys after a
    query's position are dropped here. A query that sees at most `budget` keys reads all of them (so a full
    budget is dense attention).
    The lists are built `step` queries at a time so that temporaries of size [B, Hq, step, Lk] stay bounded.
    Memory of the result: B * Hq * Lq * min(budget, Lk) int64.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    q_offset = Lk - Lq
    width = min(budget, Lk)
    device = q.device
    key_index = torch.empty(B, Hq, Lq, width, dtype=torch.long, device=device)
    slots = torch.arange(width, device=device)
    # The first queries see at most `budget` keys: they read every key up to their position.
    n_all = max(0, min(Lq, budget - q_offset))
    if n_all:
        pos = q_offset + torch.arange(n_all, device=device)[:, None]
        key_index[:, :, :n_all] = torch.where(slots[None, :] <= pos, slots[None, :], -1)
    step = max(1, _BUILD_ELEMENTS // max(1, B * Hq * max(Lk, 2 * width)))
    for start in range(n_all, Lq, step):
        end = min(Lq, start + step)
        pos = q_offset + torch.arange(start, end, device=device)[:, None]  # [n, 1]
        cand = candidates(start, end)
        cand = torch.where((cand >= 0) & (cand <= pos), cand, -1)
        key_index[:, :, start:end] = pack_keys(cand, width, distinct)
    return Selection(key_index, 1, q_offset)


def expand_heads(key_index: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """A head-independent key list [n_tiles, K] as [batch, heads, n_tiles, K] (a view, no copy)."""
    return key_index.expand(batch, heads, *key_index.shape)


def ascii_mask(selection: Selection, num_queries: int, num_keys: int, head: int = 0) -> str:
    """The (query, key) pairs read by `head` of batch item 0: '#' read, '.' skipped, ' ' in the future."""
    mask = selection.mask(num_queries, num_keys)[0, head]
    q_pos = num_keys - num_queries + torch.arange(num_queries)
    rows = []
    for i in range(num_queries):
        row = "".join("#" if mask[i, j] else ("." if j <= q_pos[i] else " ") for j in range(num_keys))
        rows.append(f"{int(q_pos[i]):4d} {row}  {int(mask[i].sum())}")
    return "\n".join(rows)


__all__ = ["pack_keys", "per_query_selection", "expand_heads", "ascii_mask"]
