"""Block-Sparse attention (Han, 2024; paper App. D, baseline 5): fixed blocks scored by mean-pooled q and k.

What it keeps. Keys are cut into blocks of `block_size` tokens (paper: 128) and queries into tiles of the same
size. A block's score for a query tile is <mean of the tile's queries, mean of the block's keys>; the queries of
a GQA group are averaged too, so each KV head selects once for its group, as DHSA does. Every query tile keeps
n = floor(N_b / block_size) whole blocks among those it can see causally: always the block holding its own
queries (the diagonal: local context) and the first block (attention sinks), then the best-scoring others.
A tile whose last query sees at most N_b keys keeps all of them (so N_b >= L is dense attention). When N_b is
smaller than a block, blocks of N_b tokens are used so that no query reads more than N_b keys.

Relation to DHSA. This is DHSA without its two contributions (paper §4, Table 4): uniform chunks of
`block_size` instead of learned boundaries, and plain means instead of the length-normalised chunk vectors.
With query_chunk = block_size and N_b a multiple of block_size of at least 3 blocks, DHSA's always-kept keys
(128 sink tokens, 128 local tokens; utils/methods/dhsa/scores.py `forced_key_counts`) are exactly the first and the diagonal
block, and `dhsa_no_robust_repr` with fixed chunks of block_size selects the same keys as `block_sparse`
(tests/test_baselines.py checks it on random inputs).

Decode (Lq = 1): the current query (averaged over its GQA group) scores the block means; it keeps its own
(partial) last block, the first block and the best others. Nothing is stored between calls.

    .venv/bin/python -m utils.methods.baselines.block_sparse     # prints the pattern on 32 tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection

_BIG = 1e30  # priority of always-kept blocks, above any real score


def block_means(x: torch.Tensor, block: int, group: int = 1) -> torch.Tensor:
    """Means of `block` consecutive rows (last block: its real rows only), averaged over `group` heads.

    x: [B, H, L, D] -> [B, H / group, ceil(L / block), D] fp32.
    """
    B, H, L, D = x.shape
    n = math.ceil(L / block)
    padded = F.pad(x.float(), (0, 0, 0, n * block - L))
    sums = padded.view(B, H // group, group, n, block, D).sum(dim=(2, 4))
    counts = torch.clamp(L - torch.arange(n, device=x.device) * block, max=block).float()
    return sums / (counts[:, None] * group)


def block_sparse_select(q: torch.Tensor, k: torch.Tensor, budget: int, block_size: int = 128) -> Selection:
    """Top blocks per query tile. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Returns a Selection with key_index [B, Hkv, n_tiles, min(budget, Lk)] and query_chunk = block length.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    device = q.device
    budget = min(budget, Lk)
    size = min(block_size, budget)                 # block length; smaller blocks when N_b < block_size
    n_keep = budget // size
    q_offset = Lk - Lq
    n_tiles, n_blocks = math.ceil(Lq / size), math.ceil(Lk / size)

    scores = torch.einsum("bhtd,bhnd->bhtn", block_means(q, size, Hq // Hkv), block_means(k, size))
    first = q_offset + torch.arange(n_tiles, device=device) * size             # first query of each tile
    last = torch.clamp(first + size - 1, max=Lk - 1)                             # last query of each tile
    block = torch.arange(n_blocks, device=device)
    # Always kept, in order of priority: the block of the tile's first query (so every query reads a key),
    # the block of its last query (the diagonal; the same block when tiles sit on the block grid), block 0.
    priority = ((block[None, :] == (first // size)[:, None]) * 3.0 + (block[None, :] == (last // size)[:, None]) * 2.0
                + (block[None, :] == 0) * 1.0)
    scores = torch.where(priority > 0, priority * _BIG, scores)
    scores = scores.masked_fill(block[None, :] * size > last[:, None], float("-inf"))
    top, chosen = torch.topk(scores, min(n_keep, n_blocks), dim=-1)            # [B, Hkv, n_tiles, n]
    chosen = torch.where(top == float("-inf"), n_blocks, chosen).sort(dim=-1).values  # unused: past the end

    keys = (chosen[..., None] * size + torch.arange(size, device=device)).flatten(-2)  # [B, Hkv, n_tiles, n*size]
    keys = torch.where(keys < Lk, keys, -1)
    width = budget
    if keys.shape[-1] < width:
        keys = F.pad(keys, (0, width - keys.shape[-1]), value=-1)
    keys = keys[..., :width]
    # Tiles whose last query sees at most N_b keys read all of them.
    slots = torch.arange(width, device=device)
    all_visible = torch.where(slots[None, :] <= last[:, None], slots[None, :], -1)
    keys = torch.where((last + 1 <= budget)[:, None], all_visible, keys)
    return Selection(keys, size, q_offset)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    return block_sparse_select(q, k, config.resolve_budget(k.shape[2]), config.block_size)


register(AttentionMethod("block_sparse", "Block-Sparse: 128-token blocks scored by mean-pooled q/k, top blocks "
                                         "per query block (first and diagonal block always kept)", _select))

__all__ = ["block_sparse_select", "block_means"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8)
    print("block_sparse: 32 tokens, blocks of 4, budget 12 (3 blocks)  (row: position, keys, count)")
    print(ascii_mask(block_sparse_select(q, k, budget=12, block_size=4), 32, 32))
