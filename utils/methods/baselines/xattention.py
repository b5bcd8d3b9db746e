"""XAttention (Xu et al., 2025; github.com/mit-han-lab/x-attention): block-sparse attention whose blocks are
scored by antidiagonal sums and kept up to a cumulative threshold.

What it keeps, per query head, on the block grid of utils/methods/baselines/threshold_blocks.py (blocks of `block_size` = 128 keys,
query tiles of 128). By default (peer_budget="adaptive", as the authors run it) the threshold alone sizes every
tile: no cap, the density reached is recorded; peer_budget="matched" caps each tile at floor(N_b / 128) blocks
(the best-scoring ones; refused when that leaves <= 2 blocks).
  1. Antidiagonal scoring. Queries and keys are cut into groups of S (`xattn_stride`, 16: the authors' LLM
     default) consecutive tokens. The score of query group a against key group b is the sum along the
     antidiagonal of their S x S attention logits, sum_t q[a*S + S-1-t] . k[b*S + t], scaled by
     1 / (sqrt(D) * S). Every antidiagonal crosses every vertical line and every slash line of the S x S square
     once, so neither pattern is missed, at 1/S of the cost of the full logits. A softmax over the key groups
     each query group may see (key group start <= the group's last query) turns the scores into a distribution;
     summed over the (128/S)^2 group pairs of a (tile, block) it gives the block score, and a tile's scores add
     up to its number of query groups.
  2. Selection, per tile, up to `xattn_threshold` (0.8, the default of their Xattention_prefill) of the tile's
     total score. rule="paper": the first block and the diagonal first, then blocks in decreasing score until
     the kept scores reach the threshold (the smallest such set). rule="official" (the authors' code, the
     default): in the tiles of their first query chunk (all tiles up to L = 16K; the first 2^28 / 2^ceil(log2 L)
     queries beyond; none when the queries do not start at key 0) only the diagonal counts first, the other
     blocks (block 0 among them) follow in decreasing score, one block more than the smallest set reaching the
     threshold is kept, and block 0 is added (their find_blocks_chunked overwrites the block-0 flag with the
     diagonal's, sums as if two blocks were forced, and pads with block 0). Other tiles: the paper's rule.
Matched: a tile whose last query sees at most N_b keys reads everything, so N_b >= L is dense attention. The
registry method stores the density reached in `context.state["reached"]` (threshold_blocks.py).

Differences from the authors' code: scores are computed per query head against the shared KV head without
repeating K (their code repeats K/V per query head: the same scores); S is reduced to gcd(S, block) when blocks
are shorter than S (tiny matched budgets); their per-head thresholds tuned for Llama-3.1-8B (load_llama.py:
llama_fuse_16, mean 0.91) are not used: one threshold for every head. Decode: XAttention decodes densely (the
default `decode="dense"`); with decode="sparse" a step scores blocks with the new token alone, which in its group
of S pairs with the last key of every key group (a strided sample).

Selection: one list per query head and query tile (Hs = Hq, query_chunk = block size); `xattention_select(...,
block_mode=True)` gives the block-number form the GPU block kernel reads (the registry method returns it on a GPU).

    .venv/bin/python -m utils.methods.baselines.xattention     # prints the pattern on 64 tokens
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.threshold_blocks import (REACHED, BlockGrid, block_selection, check_matched, cover_mask, keep_blocks,
                     method_selection, reached, token_selection)

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


def official_chunk_tiles(grid: BlockGrid) -> int:
    """Tiles in the first query chunk of the authors' xattn_estimate (where their block-0 flag is overwritten):
    their chunk is max(2048, min(max(2048, P), 2^28 // P)) queries, P = 2^ceil(log2 Lk); none when the queries
    do not start at key 0 (their current index is then > 0)."""
    if grid.q_offset != 0:
        return 0
    p = 1 << (grid.num_keys - 1).bit_length()
    chunk = max(min(max(2048, p), 128 * 1024 * 2048 // p), 2048)
    return chunk // grid.size


def threshold_mask(scores: torch.Tensor, grid: BlockGrid, threshold: float, rule: str = "official"
                   ) -> torch.Tensor:
    """[B, H, n_tiles, n_blocks] bool: the blocks each tile keeps by the threshold (module docstring, step 2)."""
    scores = scores.double()  # their sums are float64 (find_blocks_chunked): the same ties at the threshold
    forced = (grid.forced() > 0).expand_as(scores)
    wanted = cover_mask(scores, threshold, first=forced)                                 # paper's rule
    n_official = min(official_chunk_tiles(grid), grid.n_tiles)
    if rule == "official" and n_official:
        tiles = slice(0, n_official)
        part = scores[:, :, tiles]
        block = torch.arange(grid.n_blocks, device=scores.device)
        diagonal = (block[None, :] == (grid.last()[tiles] // grid.size)[:, None]).expand_as(part)
        count = cover_mask(part, threshold, first=diagonal).sum(-1, keepdim=True)       # diagonal + smallest set
        order = torch.where(diagonal, float("inf"), part)
        rank = order.argsort(dim=-1, descending=True).argsort(dim=-1)
        official = (rank <= count) | (block == 0)                                        # one more, and block 0
        wanted = torch.cat((official, wanted[:, :, n_official:]), dim=2)
    return wanted


def xattention_blocks(q: torch.Tensor, k: torch.Tensor, budget: int | None = None, block_size: int = 128,
                      threshold: float = 0.8, stride: int = 16, rule: str = "official"
                      ) -> tuple[torch.Tensor, BlockGrid]:
    """Blocks per tile [B, Hq, n_tiles, W] (ascending, -1 after) and their grid. budget None: adaptive (the
    authors' setting, no cap); an int: matched to N_b = budget."""
    grid = BlockGrid.make(q.shape[2], k.shape[2], budget, block_size, q.device)
    check_matched(grid, "xattention")
    scores = antidiagonal_block_scores(q, k, grid, stride)
    wanted = threshold_mask(scores, grid, threshold, rule)
    return keep_blocks(torch.where(wanted, scores, float("-inf")), grid), grid


def xattention_select(q: torch.Tensor, k: torch.Tensor, budget: int | None = None, block_size: int = 128,
                      threshold: float = 0.8, stride: int = 16, block_mode: bool = False, rule: str = "official"
                      ) -> Selection:
    """XAttention's selection. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Token lists [B, Hq, n_tiles, <= budget or Lk] (query_chunk = block length), or with block_mode=True block
    numbers for the GPU block kernel (block length a multiple of 16). budget None: adaptive (no cap)."""
    blocks, grid = xattention_blocks(q, k, budget, block_size, threshold, stride, rule)
    return block_selection(blocks, grid) if block_mode else token_selection(blocks, grid)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    budget = config.resolve_budget(k.shape[2]) if config.peer_budget == "matched" else None
    blocks, grid = xattention_blocks(q, k, budget, config.block_size, config.xattn_threshold,
                                     config.xattn_stride, config.xattn_rule)
    if q.shape[2] > 1:
        context.state[REACHED] = reached(blocks, grid)
    return method_selection(blocks, grid, q.is_cuda)


register(AttentionMethod("xattention", "XAttention: 128-blocks scored by strided antidiagonal sums, kept up to a "
                                       "cumulative threshold (the authors' rule; --peer-budget matched caps at N_b "
                                       "per query)", _select))

__all__ = ["xattention_select", "xattention_blocks", "antidiagonal_block_scores", "threshold_mask"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    L, D = 64, 64
    q, k = torch.randn(1, 1, L, D), torch.randn(1, 1, L, D)
    q[:, 0, 9:] += 3 * k[0, 0, :L - 9]              # query i looks at key i - 9 (a slash line)
    blocks, grid = xattention_blocks(q, k, budget=24, block_size=8, threshold=0.9, stride=4)
    print("xattention: 64 tokens, blocks of 8, stride 4, budget 24 (3 blocks), threshold 0.9; query i looks at "
          "key i - 9  (row: position, keys, count)")
    print(ascii_mask(token_selection(blocks, grid), L, L))
    print("reached:", {key: round(float(v), 3) for key, v in reached(blocks, grid).items()})
