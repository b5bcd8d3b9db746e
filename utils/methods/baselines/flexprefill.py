"""FlexPrefill (Lai et al., ICLR 2025; github.com/bytedance/FlexPrefill): per head, a query-aware choice between
a vertical-slash pattern and a query-aware block pattern, each sized by a cumulative-attention threshold gamma.

What it keeps, per query head, on the block grid of utils/methods/baselines/threshold_blocks.py (blocks of `block_size` = 128 keys,
query tiles of 128). By default (peer_budget="adaptive", as the authors run it) gamma alone sizes every tile:
there is no cap and the density it reaches is recorded; peer_budget="matched" caps each tile at
floor(N_b / 128) blocks (refused when that leaves <= 2 blocks).
  1. The last 128 queries' true attention a (softmax of q . k / sqrt(D), causal) gives a vertical distribution
     (attention per key, averaged over those queries) and a slash distribution (attention per distance
     q_pos - k_pos). Pooled into blocks, the vertical one is the true block distribution of the last queries.
  2. The estimated block distribution is softmax(mean of the last queries . block means of the keys / sqrt(D)).
     If its square-root Jensen-Shannon divergence from the true one is below tau (0.1), mean-pooled blocks
     describe this head well: it is *query-aware*. Otherwise it is *vertical-slash*.
  3. Counts. t = the fewest key columns (separately: distances) covering gamma of the vertical (slash) attention.
     rule="official" (the authors' code, the default): t is the number of sorted entries whose cumulative sum
     is <= gamma, plus one, and the set holds t // 128 + 1 blocks *including* the forced one (block 0 for
     vertical, the main diagonal for slash). rule="paper": ceil(t / 128) best blocks *besides* the forced one.
     Both: at least ceil(min_budget / 128) blocks (`flex_min_budget`, 1024 tokens in the authors' scripts: 8
     blocks), at most all of them. A query-aware head's vertical and slash sets hold that minimum.
  4. Vertical-slash part: each tile reads its vertical blocks and the blocks at its chosen block diagonals.
  5. Query-aware head, besides: every tile scores the blocks it sees by softmax(mean of its queries . block means
     / sqrt(D)); the (tile, block) scores of the head are taken in decreasing order while their cumulative sum
     is <= gamma x n_tiles (rule="official": each tile's row adds up to 1; rule="paper": up to and including
     the entry that reaches it).
Always kept: the first block and the diagonal (the tile's own block). Adaptive: a sequence of at most
max(2 x 128, min_budget rounded up to blocks) keys is read densely (the authors' short-sequence rule). Matched:
a tile whose last query sees at most N_b keys reads everything (N_b >= L is dense attention); when a tile wants
more than its cap, the blocks with the most estimated attention (vertical + slash score; query-aware: the block
score) are kept. The registry method stores the density reached in `context.state["reached"]` (threshold_blocks.py).

Where the authors' code differs and this one does not follow it: when L % 128 != 0 their slash distribution is
pooled into blocks from the far end (distance L - 1 down), so their "block diagonal" o holds the distances
r + 128 (o - 1) .. r + 128 o - 1 (r = L mod 128, o = 0: distances < r); here block diagonals stay aligned to the
block grid (distances 128 o .. 128 o + 127). Their counts divide by a literal 128 (here: the block size; equal
at 128). They need q_len == k_len; here the queries may be the last Lq of Lk keys (tiles from the first query).
Scores per query head against the shared KV head (theirs repeat K: the same numbers).
Decode: FlexPrefill decodes densely (the default `decode="dense"`); with decode="sparse" a step runs the same rule
with the new token as the only query.

Selection: one list per query head and query tile (Hs = Hq, query_chunk = block size); `flexprefill_select(...,
block_mode=True)` gives the block-number form the GPU block kernel reads (the registry method returns it on a GPU).

    .venv/bin/python -m utils.methods.baselines.flexprefill     # prints both patterns on 64 tokens
"""

from __future__ import annotations

import math

import torch

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.block_sparse import block_means
from utils.methods.baselines.threshold_blocks import (REACHED, BlockGrid, block_selection, check_matched, cover_mask, keep_blocks,
                     method_selection, reached, token_selection, within_mask)
from utils.methods.baselines.oracle import last_query_attention


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions along the last dim."""
    mid = (p + q) / 2

    def kl_to_mid(x):  # x > 0 implies mid > 0; x = 0 adds nothing
        return torch.where(x > 0, x * (x / mid.clamp(min=1e-30)).log(), 0.0).sum(-1)

    return (0.5 * kl_to_mid(p) + 0.5 * kl_to_mid(q)).clamp(min=0).sqrt()


def blocks_needed(distribution: torch.Tensor, gamma: float, size: int, rule: str = "official",
                  min_blocks: int = 1) -> torch.Tensor:
    """How many blocks a vertical or slash set holds, including its forced block, [...]. distribution: [..., L]
    (sums to 1). official: t = #(sorted cumulative sum <= gamma) + 1 tokens, t // size + 1 blocks; paper: t = the
    fewest tokens reaching gamma, ceil(t / size) + 1 blocks. At least min_blocks, at most ceil(L / size)."""
    if rule == "official":
        count = within_mask(distribution, gamma).sum(-1) + 1
        count = torch.div(count, size, rounding_mode="floor") + 1
    else:
        tokens = cover_mask(distribution, gamma).sum(-1)
        count = torch.div(tokens + size - 1, size, rounding_mode="floor") + 1
    return count.clamp(min=min_blocks, max=math.ceil(distribution.shape[-1] / size))


def _top_set(scores: torch.Tensor, count: torch.Tensor, always: int) -> torch.Tensor:
    """[..., n] bool: entry `always` and the best others of `scores` [..., n], `count` [...] entries in all."""
    order = scores.clone()
    order[..., always] = float("inf")
    rank = order.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < count[..., None]


def _sum_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of `size` consecutive entries of the last dim (zero-padded): [..., L] -> [..., ceil(L / size)]."""
    pad = (-x.shape[-1]) % size
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, size)).sum(-1)


def head_patterns(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, gamma: float, tau: float, block_size: int,
                  rule: str = "official", min_budget: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranking of the blocks each tile wants, and which heads are query-aware.

    Returns rank [B, Hq, n_tiles, n_blocks] (-inf = not wanted; higher = kept first under a cap) and
    query_aware [B, Hq] bool. See the module docstring for the rule."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    size, n_blocks = grid.size, grid.n_blocks
    num_last = min(block_size, Lq)
    vertical, slash = last_query_attention(q, k, num_last)
    vertical_blocks, slash_blocks = _sum_pool(vertical, size), _sum_pool(slash, size)   # [B, Hq, n_blocks]

    # Pattern choice: estimated vs true block distribution of the last queries.
    key_means = block_means(k, size)                                                    # [B, Hkv, n_blocks, D]
    last_mean = q[:, :, Lq - num_last:].float().mean(dim=2)                             # [B, Hq, D]
    estimate = torch.matmul(last_mean.view(B, Hkv, Hq // Hkv, D), key_means.transpose(-1, -2)) * D ** -0.5
    estimate = torch.softmax(estimate.view(B, Hq, n_blocks), dim=-1)
    query_aware = sqrt_js_divergence(estimate, vertical_blocks) < tau

    # Vertical and slash sets sized by gamma (query-aware heads: the minimum).
    min_blocks = max(1, math.ceil(min_budget / size))
    n_vertical = torch.where(query_aware, min_blocks, blocks_needed(vertical, gamma, size, rule, min_blocks))
    n_slash = torch.where(query_aware, min_blocks, blocks_needed(slash, gamma, size, rule, min_blocks))
    is_vertical = _top_set(vertical_blocks, n_vertical, always=0)                       # [B, Hq, nb]
    is_slash = _top_set(slash_blocks, n_slash, always=0)                                # offsets
    tile_block = grid.last() // size                                                    # [n_tiles]
    offset = tile_block[:, None] - torch.arange(n_blocks, device=q.device)[None, :]     # [nt, nb]
    at = offset.clamp(min=0).expand(B, Hq, -1, -1).flatten(-2)
    on_slash = is_slash.gather(-1, at).view(B, Hq, *offset.shape) & (offset >= 0)
    slash_score = slash_blocks.gather(-1, at).view(B, Hq, *offset.shape)
    wanted_vs = is_vertical[:, :, None, :] | on_slash
    rank_vs = torch.where(wanted_vs, vertical_blocks[:, :, None, :] + slash_score, float("-inf"))

    # Query-aware heads: mean-pooled tile x block attention, covered to gamma over the whole head.
    tile_means = block_means(q, size)                                                   # [B, Hq, n_tiles, D]
    scores = torch.matmul(tile_means.view(B, Hkv, -1, D), key_means.transpose(-1, -2)) * D ** -0.5
    scores = scores.view(B, Hq, grid.n_tiles, n_blocks).masked_fill(~grid.visible(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if rule == "official":
        chosen = within_mask(probs.flatten(-2), gamma * grid.n_tiles).view_as(probs)
    else:
        chosen = cover_mask(probs.flatten(-2), gamma).view_as(probs)
    rank_qa = torch.where(chosen | wanted_vs, probs, float("-inf"))

    return torch.where(query_aware[:, :, None, None], rank_qa, rank_vs), query_aware


def short_sequence(num_keys: int, size: int, min_budget: int) -> bool:
    """The authors' dense rule (adaptive mode): at most max(2 blocks, min_budget rounded up to blocks) keys."""
    return num_keys <= max(2 * size, math.ceil(min_budget / size) * size)


def flexprefill_blocks(q: torch.Tensor, k: torch.Tensor, budget: int | None = None, block_size: int = 128,
                       gamma: float = 0.9, tau: float = 0.1, rule: str = "official", min_budget: int = 0
                       ) -> tuple[torch.Tensor, BlockGrid, torch.Tensor]:
    """Blocks per tile [B, Hq, n_tiles, W] (ascending, -1 after), their grid, and query_aware [B, Hq].

    budget None: adaptive (the authors' setting, no cap); an int: matched to N_b = budget."""
    grid = BlockGrid.make(q.shape[2], k.shape[2], budget, block_size, q.device)
    check_matched(grid, "flexprefill")
    rank, query_aware = head_patterns(q, k, grid, gamma, tau, block_size, rule, min_budget)
    if not grid.capped and short_sequence(k.shape[2], grid.size, min_budget):
        rank = torch.zeros_like(rank)                                                   # every visible block
    return keep_blocks(rank, grid), grid, query_aware


def flexprefill_select(q: torch.Tensor, k: torch.Tensor, budget: int | None = None, block_size: int = 128,
                       gamma: float = 0.9, tau: float = 0.1, block_mode: bool = False, rule: str = "official",
                       min_budget: int = 0) -> Selection:
    """FlexPrefill's selection. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Token lists [B, Hq, n_tiles, <= budget or Lk] (query_chunk = block length), or with block_mode=True block
    numbers for the GPU block kernel (block length a multiple of 16). budget None: adaptive (no cap)."""
    blocks, grid, _ = flexprefill_blocks(q, k, budget, block_size, gamma, tau, rule, min_budget)
    return block_selection(blocks, grid) if block_mode else token_selection(blocks, grid)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    budget = config.resolve_budget(k.shape[2]) if config.peer_budget == "matched" else None
    blocks, grid, _ = flexprefill_blocks(q, k, budget, config.block_size, config.flex_gamma, config.flex_tau,
                                         config.flex_rule, config.flex_min_budget)
    if q.shape[2] > 1:
        context.state[REACHED] = reached(blocks, grid)
    return method_selection(blocks, grid, q.is_cuda)


register(AttentionMethod("flexprefill", "FlexPrefill: per head vertical-slash or query-aware 128-blocks, sized to "
                                        "cover gamma of the attention (the authors' rules; --peer-budget matched caps "
                                        "at N_b per query)", _select))

__all__ = ["flexprefill_select", "flexprefill_blocks", "head_patterns", "sqrt_js_divergence", "blocks_needed"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    torch.manual_seed(0)
    L, D = 64, 64
    q, k = torch.randn(1, 2, L, D), torch.randn(1, 1, L, D)
    q[:, 0] += 3 * k[0, 0, 37]                      # head 0: every query from 37 on looks at key 37 (a vertical)
    q[:, 1, 9:] += 3 * k[0, 0, :L - 9]              # head 1: query i looks at key i - 9 (a slash line)
    blocks, grid, aware = flexprefill_blocks(q, k, budget=24, block_size=8, gamma=0.9, tau=0.1)
    sel = token_selection(blocks, grid)
    for head in range(2):
        print(f"flexprefill head {head} ({'query-aware' if aware[0, head] else 'vertical-slash'}): 64 tokens, "
              f"blocks of 8, budget 24 (3 blocks), gamma 0.9  (row: position, keys, count)")
        print(ascii_mask(sel, L, L, head=head))
    print("reached:", {key: round(float(v), 3) for key, v in reached(blocks, grid).items()})
