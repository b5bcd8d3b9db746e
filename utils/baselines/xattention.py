"""XAttention (Xu et al., 2025; github.com/mit-han-lab/x-attention): block-sparse attention whose blocks are
scored by antidiagonal sums and kept up to a cumulative threshold.

What it keeps, per query head, on the block grid of utils/baselines/blocks.py (blocks of `block_size` = 128 keys,
query tiles of 128; at most floor(N_b / 128) blocks per tile, so no query reads more than N_b keys):
  1. Antidiagonal scoring. Queries and keys are cut into groups of S (`xattn_stride`, 8) consecutive tokens. The
     score of query group a against key group b is the sum along the antidiagonal of their S x S attention
     logits, sum_t q[a*S + S-1-t] . k[b*S + t], scaled by 1 / (sqrt(D) * S). Every antidiagonal crosses every
     vertical line and every slash line of the S x S square once, so neither pattern is missed, at 1/S of the
     cost of the full logits. A softmax over the key groups each query group may see (key group start <= the
     group's last query) turns the scores into a distribution; summed over the (128/S)^2 group pairs of a
     (tile, block) it gives the block score, and a tile's scores add up to its number of query groups.
  2. Selection. Per tile, the first block and the diagonal (the tile's own block) first, then blocks in
     decreasing score until the kept scores reach `xattn_threshold` (0.9) of the tile's total; at most
     floor(N_b / 128) blocks (the best-scoring ones when the threshold asks for more).
Tiles whose last query sees at most N_b keys read everything, so N_b >= L is dense attention. Because the
threshold can stop short of the cap, the registry method stores the density it reached in
`context.state["reached"]` (blocks.py).

Differences from the authors' code, to fit the shared harness: the budget cap per tile; scores are computed per
query head against the shared KV head without repeating K (their code repeats K/V per query head: the same
scores); S is reduced to gcd(S, block) when blocks are shorter than S (tiny budgets); their optional per-head
threshold prediction is not used. Decode: XAttention decodes densely (the default `decode="dense"`); with
decode="sparse" a step scores blocks with the new token alone, which in its group of S pairs with the last key
of every key group (a strided sample).

Selection: one list per query head and query tile (Hs = Hq, query_chunk = block size); `xattention_select(...,
block_mode=True)` gives the block-number form the GPU block kernel reads.

    .venv/bin/python -m utils.baselines.xattention     # prints the pattern on 64 tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import SparseAttentionConfig
from ..registry import AttentionMethod, LayerContext, register
from ..selection import Selection
from .blocks import REACHED, BlockGrid, block_selection, cover_mask, keep_blocks, reached, token_selection

_STEP_ELEMENTS = 1 << 24  # elements of the group-score temporaries of one step (4x on a GPU: fewer, larger steps)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, stride: int = 8) -> torch.Tensor:
    """Block scores [B, Hq, n_tiles, n_blocks] fp32 (0 where a tile sees no key of the block).

    q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D]. Query groups start at the first query,
    key groups at key 0; a tile's row adds up to its number of query groups holding a real query.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    S = math.gcd(stride, grid.size)
    per_block = grid.size // S                       # groups per tile and per key block
    n_qgroups, n_kgroups = grid.n_tiles * per_block, grid.n_blocks * per_block
    # Group a of the queries reversed and concatenated, so that one dot product sums an antidiagonal.
    q_groups = F.pad(q.float(), (0, 0, 0, n_qgroups * S - Lq)).reshape(B, Hq, n_qgroups, S, D).flip(3)
    q_groups = q_groups.reshape(B, Hkv, G, n_qgroups, S * D)
    k_groups = F.pad(k.float(), (0, 0, 0, n_kgroups * S - Lk)).reshape(B, Hkv, n_kgroups, S * D)
    group = torch.arange(n_qgroups, device=q.device)
    group_last = torch.clamp(grid.q_offset + group * S + S - 1, max=Lk - 1)       # last real query of a group
    real = group * S < Lq
    key_start = torch.arange(n_kgroups, device=q.device) * S
    scale = D ** -0.5 / S

    out = torch.empty(B, Hq, grid.n_tiles, grid.n_blocks, device=q.device)
    step_elements = _STEP_ELEMENTS * (4 if q.is_cuda else 1)
    tiles_per_step = max(1, step_elements // max(1, B * Hq * per_block * n_kgroups))
    for t0 in range(0, grid.n_tiles, tiles_per_step):
        t1 = min(grid.n_tiles, t0 + tiles_per_step)
        rows = slice(t0 * per_block, t1 * per_block)
        n = (t1 - t0) * per_block
        logits = torch.matmul(q_groups[:, :, :, rows].reshape(B, Hkv, G * n, S * D), k_groups.transpose(-1, -2))
        logits = logits.view(B, Hq, n, n_kgroups) * scale
        logits = logits.masked_fill(key_start[None, :] > group_last[rows, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1) * real[rows, None]
        out[:, :, t0:t1] = probs.view(B, Hq, t1 - t0, per_block, grid.n_blocks, per_block).sum(dim=(3, 5))
    return out


def xattention_blocks(q: torch.Tensor, k: torch.Tensor, budget: int, block_size: int = 128,
                      threshold: float = 0.9, stride: int = 8) -> tuple[torch.Tensor, BlockGrid]:
    """Blocks per tile [B, Hq, n_tiles, W] (ascending, -1 after) and their grid."""
    grid = BlockGrid.make(q.shape[2], k.shape[2], budget, block_size, q.device)
    scores = antidiagonal_block_scores(q, k, grid, stride)
    wanted = cover_mask(scores, threshold, first=(grid.forced() > 0).expand_as(scores))
    return keep_blocks(torch.where(wanted, scores, float("-inf")), grid), grid


def xattention_select(q: torch.Tensor, k: torch.Tensor, budget: int, block_size: int = 128, threshold: float = 0.9,
                      stride: int = 8, block_mode: bool = False) -> Selection:
    """XAttention's selection. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Token lists [B, Hq, n_tiles, <= budget] (query_chunk = block length), or with block_mode=True block numbers
    for the GPU block kernel (block length a multiple of 16)."""
    blocks, grid = xattention_blocks(q, k, budget, block_size, threshold, stride)
    return block_selection(blocks, grid) if block_mode else token_selection(blocks, grid)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    blocks, grid = xattention_blocks(q, k, config.resolve_budget(k.shape[2]), config.block_size,
                                     config.xattn_threshold, config.xattn_stride)
    if q.shape[2] > 1:
        context.state[REACHED] = reached(blocks, grid)
    return token_selection(blocks, grid)


register(AttentionMethod("xattention", "XAttention: 128-blocks scored by strided antidiagonal sums, kept up to a "
                                       "cumulative threshold (capped at N_b per query)", _select))

__all__ = ["xattention_select", "xattention_blocks", "antidiagonal_block_scores"]


if __name__ == "__main__":
    from .common import ascii_mask

    torch.manual_seed(0)
    L, D = 64, 64
    q, k = torch.randn(1, 1, L, D), torch.randn(1, 1, L, D)
    q[:, 0, 9:] += 3 * k[0, 0, :L - 9]              # query i looks at key i - 9 (a slash line)
    blocks, grid = xattention_blocks(q, k, budget=24, block_size=8, threshold=0.9, stride=4)
    print("xattention: 64 tokens, blocks of 8, stride 4, budget 24 (3 blocks), threshold 0.9; query i looks at "
          "key i - 9  (row: position, keys, count)")
    print(ascii_mask(token_selection(blocks, grid), L, L))
    print("reached:", {key: round(float(v), 3) for key, v in reached(blocks, grid).items()})
