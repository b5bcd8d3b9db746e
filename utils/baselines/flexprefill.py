"""FlexPrefill (Lai et al., ICLR 2025; github.com/bytedance/FlexPrefill): per head, a query-aware choice between
a vertical-slash pattern and a query-aware block pattern, each sized by a cumulative-attention threshold gamma.

What it keeps, per query head, on the block grid of utils/baselines/blocks.py (blocks of `block_size` = 128 keys,
query tiles of 128; at most floor(N_b / 128) blocks per tile, so no query reads more than N_b keys):
  1. The last 128 queries' true attention a (softmax of q . k / sqrt(D), causal) gives a vertical distribution
     (attention per key, averaged over those queries) and a slash distribution (attention per distance
     q_pos - k_pos). Pooled into blocks, the vertical one is the true block distribution of the last queries.
  2. The estimated block distribution is softmax(mean of the last queries . block means of the keys / sqrt(D)).
     If its square-root Jensen-Shannon divergence from the true one is below tau (0.1), mean-pooled blocks
     describe this head well: it is *query-aware*. Otherwise it is *vertical-slash*.
  3. Vertical-slash head: take the fewest key columns (and, separately, distances) that cover gamma (0.9) of the
     vertical (slash) attention, round each count up to blocks, and keep that many best vertical blocks (plus
     block 0) and best block diagonals (plus the main one). A tile reads its vertical blocks and the blocks at
     its chosen diagonals; when that is more than the cap, the blocks with the most estimated attention
     (vertical + slash score) are kept.
  4. Query-aware head: every tile scores the blocks it sees by softmax(mean of its queries . block means /
     sqrt(D)); the highest (tile, block) scores of the head are kept until they cover gamma of the head's total
     (each tile's row adds up to 1), then each tile is capped at floor(N_b / 128) by score.
Always kept: the first block and the diagonal (the tile's own block). Tiles whose last query sees at most N_b keys
read everything, so N_b >= L is dense attention. gamma and tau are `flex_gamma` / `flex_tau` in
SparseAttentionConfig; because gamma can stop short of the cap, the registry method stores the density it
reached in `context.state["reached"]` (blocks.py).

Differences from the authors' code, all to fit the shared harness: the budget cap per tile (their max_budget only
caps a head's vertical and slash counts, and is off by default) and no floor (their min_budget, 1024 tokens in their
runs, keeps at least 8 vertical and 8 slash blocks); so that a concentrated line is still found without that floor,
a set holds ceil(tokens / block) best blocks on top of the always-kept one (their count, tokens // 128 + 1, includes
it); a tile whose last query sees at most N_b keys is dense (theirs: sequences up to 2 blocks or min_budget).
Decode: FlexPrefill decodes densely (the default `decode="dense"`); with decode="sparse" a step runs the same rule
with the new token as the only query.

Selection: one list per query head and query tile (Hs = Hq, query_chunk = block size); `flexprefill_select(...,
block_mode=True)` gives the block-number form the GPU block kernel reads.

    .venv/bin/python -m utils.baselines.flexprefill     # prints both patterns on 64 tokens
"""

from __future__ import annotations

import torch

from ..config import SparseAttentionConfig
from ..registry import AttentionMethod, LayerContext, register
from ..selection import Selection
from .block_sparse import block_means
from .blocks import REACHED, BlockGrid, block_selection, cover_mask, keep_blocks, reached, token_selection
from .oracle import last_query_attention


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions along the last dim."""
    mid = (p + q) / 2

    def kl_to_mid(x):  # x > 0 implies mid > 0; x = 0 adds nothing
        return torch.where(x > 0, x * (x / mid.clamp(min=1e-30)).log(), 0.0).sum(-1)

    return (0.5 * kl_to_mid(p) + 0.5 * kl_to_mid(q)).clamp(min=0).sqrt()


def _blocks_needed(distribution: torch.Tensor, gamma: float, size: int) -> torch.Tensor:
    """Blocks that the fewest tokens covering gamma of `distribution` [..., L] fill: ceil(tokens / size), [...]."""
    tokens = cover_mask(distribution, gamma).sum(-1)
    return torch.div(tokens + size - 1, size, rounding_mode="floor")


def _top_set(scores: torch.Tensor, count: torch.Tensor, always: int) -> torch.Tensor:
    """[..., n] bool: entry `always` and the `count` [...] best others of `scores` [..., n]."""
    order = scores.clone()
    order[..., always] = float("inf")
    rank = order.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank <= count[..., None]


def _sum_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of `size` consecutive entries of the last dim (zero-padded): [..., L] -> [..., ceil(L / size)]."""
    pad = (-x.shape[-1]) % size
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (-1, size)).sum(-1)


def head_patterns(q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, gamma: float, tau: float, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranking of the blocks each tile wants, and which heads are query-aware.

    Returns rank [B, Hq, n_tiles, n_blocks] (-inf = not wanted; higher = kept first under the cap) and
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

    # Vertical-slash heads: vertical blocks and block diagonals sized by gamma.
    is_vertical = _top_set(vertical_blocks, _blocks_needed(vertical, gamma, size), always=0)      # [B, Hq, nb]
    is_slash = _top_set(slash_blocks, _blocks_needed(slash, gamma, size), always=0)               # offsets
    tile_block = grid.last() // size                                                              # [n_tiles]
    offset = tile_block[:, None] - torch.arange(n_blocks, device=q.device)[None, :]               # [nt, nb]
    at = offset.clamp(min=0).expand(B, Hq, -1, -1).flatten(-2)
    on_slash = is_slash.gather(-1, at).view(B, Hq, *offset.shape) & (offset >= 0)
    slash_score = slash_blocks.gather(-1, at).view(B, Hq, *offset.shape)
    wanted = is_vertical[:, :, None, :] | on_slash
    rank_vs = torch.where(wanted, vertical_blocks[:, :, None, :] + slash_score, float("-inf"))

    # Query-aware heads: mean-pooled tile x block attention, covered to gamma over the whole head.
    tile_means = block_means(q, size)                                                   # [B, Hq, n_tiles, D]
    scores = torch.matmul(tile_means.view(B, Hkv, -1, D), key_means.transpose(-1, -2)) * D ** -0.5
    scores = scores.view(B, Hq, grid.n_tiles, n_blocks).masked_fill(~grid.visible(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    chosen = cover_mask(probs.flatten(-2), gamma).view_as(probs)
    rank_qa = torch.where(chosen, probs, float("-inf"))

    return torch.where(query_aware[:, :, None, None], rank_qa, rank_vs), query_aware


def flexprefill_blocks(q: torch.Tensor, k: torch.Tensor, budget: int, block_size: int = 128, gamma: float = 0.9,
                       tau: float = 0.1) -> tuple[torch.Tensor, BlockGrid, torch.Tensor]:
    """Blocks per tile [B, Hq, n_tiles, W] (ascending, -1 after), their grid, and query_aware [B, Hq]."""
    grid = BlockGrid.make(q.shape[2], k.shape[2], budget, block_size, q.device)
    rank, query_aware = head_patterns(q, k, grid, gamma, tau, block_size)
    return keep_blocks(rank, grid), grid, query_aware


def flexprefill_select(q: torch.Tensor, k: torch.Tensor, budget: int, block_size: int = 128, gamma: float = 0.9,
                       tau: float = 0.1, block_mode: bool = False) -> Selection:
    """FlexPrefill's selection. q: [B, Hq, Lq, D] at positions Lk - Lq .. Lk - 1; k: [B, Hkv, Lk, D].

    Token lists [B, Hq, n_tiles, <= budget] (query_chunk = block length), or with block_mode=True block numbers
    for the GPU block kernel (block length a multiple of 16)."""
    blocks, grid, _ = flexprefill_blocks(q, k, budget, block_size, gamma, tau)
    return block_selection(blocks, grid) if block_mode else token_selection(blocks, grid)


def _select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
    blocks, grid, _ = flexprefill_blocks(q, k, config.resolve_budget(k.shape[2]), config.block_size,
                                         config.flex_gamma, config.flex_tau)
    if q.shape[2] > 1:
        context.state[REACHED] = reached(blocks, grid)
    return token_selection(blocks, grid)


register(AttentionMethod("flexprefill", "FlexPrefill: per head vertical-slash or query-aware 128-blocks, sized to "
                                        "cover gamma of the attention (capped at N_b per query)", _select))

__all__ = ["flexprefill_select", "flexprefill_blocks", "head_patterns", "sqrt_js_divergence"]


if __name__ == "__main__":
    from .common import ascii_mask

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
