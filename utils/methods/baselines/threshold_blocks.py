"""Helpers, no method of their own: block-aligned selections for the methods that choose whole key blocks per
query tile by a threshold (flexprefill.py, xattention.py): the block grid, the per-tile cap at N_b, the two output forms (token lists for
every consumer, block lists for the GPU block kernel) and the density a selection really reached.

Grid. Keys are cut into blocks of `size` tokens from position 0; queries (at positions Lk - Lq .. Lk - 1) into
tiles of `size` consecutive queries from the first one. Two budget modes:
  adaptive (budget None, the authors' setting): size = block_size and no cap: the method's own threshold decides
    how many blocks a tile reads (the density it reaches is recorded, see below);
  matched (a budget N_b): size = min(block_size, N_b), so that one block never exceeds the budget, and a tile
    keeps at most n_keep = floor(N_b / size) blocks, so no query reads more than N_b keys. A tile whose last
    query sees at most N_b keys reads all of them, as in every method here, so N_b >= L is dense attention
    whatever the threshold. `check_matched` refuses budgets that leave <= 2 blocks per tile (only the forced
    ones: no data-dependent choice is left).
Always kept (in this order of priority when n_keep is small): the block of the tile's first query (so every
query reads a key), the block of its last query (the diagonal) and block 0 (attention sinks); both FlexPrefill
and XAttention keep the first column and the diagonal.

Density reached. A threshold method reads what its threshold asks for (adaptive), or possibly fewer than N_b
keys (matched). `reached(blocks, grid)` counts the (query, key) pairs the selection really reads (causal, exact)
and the registry methods store it per layer in `context.state["reached"]` (see REACHED); `reached_density(model)`
averages it over a patched model's layers, and `density_reached(model)` is the number the runners' records keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.selection import KernelSelection

REACHED = "reached"  # LayerContext.state key: {"keys_read", "density", "causal_fraction"} (0-d tensors) of the
#                      layer's last prefill: mean keys read per query and query head, keys_read / Lk (comparable
#                      with the config's density N_b / L), and read pairs / causally visible pairs
_BIG = 1e30  # priority of always-kept blocks, above any score
_NONE = torch.iinfo(torch.long).max


@dataclass(frozen=True)
class BlockGrid:
    """Geometry of a block selection for Lq queries at positions Lk - Lq .. Lk - 1 over Lk keys."""

    num_queries: int
    num_keys: int
    budget: int      # N_b, at most num_keys (num_keys when not capped)
    size: int        # keys per block = queries per tile
    device: torch.device | str | None = None
    capped: bool = True  # matched budget: at most n_keep blocks per tile; False: adaptive, no cap

    @classmethod
    def make(cls, num_queries: int, num_keys: int, budget: int | None, block_size: int, device=None
             ) -> "BlockGrid":
        """budget None: adaptive (no cap, blocks of block_size); else matched to N_b = budget."""
        if budget is None:
            if block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {block_size}")
            return cls(num_queries, num_keys, num_keys, block_size, device, capped=False)
        if block_size < 1 or budget < 1:
            raise ValueError(f"block_size and budget must be >= 1, got {block_size}, {budget}")
        budget = min(budget, num_keys)
        return cls(num_queries, num_keys, budget, min(block_size, budget), device)

    @property
    def q_offset(self) -> int:
        return self.num_keys - self.num_queries

    @property
    def n_keep(self) -> int:
        return self.budget // self.size if self.capped else self.n_blocks

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.num_queries / self.size)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.num_keys / self.size)

    def first(self) -> torch.Tensor:
        """Position of each tile's first query [n_tiles]."""
        return self.q_offset + torch.arange(self.n_tiles, device=self.device) * self.size

    def last(self) -> torch.Tensor:
        """Position of each tile's last query [n_tiles]."""
        return torch.clamp(self.first() + self.size - 1, max=self.num_keys - 1)

    def visible(self) -> torch.Tensor:
        """[n_tiles, n_blocks] bool: the block holds a key some query of the tile may read."""
        start = torch.arange(self.n_blocks, device=self.device) * self.size
        return start[None, :] <= self.last()[:, None]

    def forced(self) -> torch.Tensor:
        """[n_tiles, n_blocks] priority of the always-kept blocks: 3 first query's block, 2 last query's, 1 block 0."""
        block = torch.arange(self.n_blocks, device=self.device)[None, :]
        return ((block == (self.first() // self.size)[:, None]) * 3.0
                + (block == (self.last() // self.size)[:, None]) * 2.0 + (block == 0) * 1.0)

    def dense(self) -> torch.Tensor:
        """[n_tiles] bool: the tile's last query sees at most N_b keys, so the tile reads everything (matched
        budget only; never when adaptive)."""
        if not self.capped:
            return torch.zeros(self.n_tiles, dtype=torch.bool, device=self.device)
        return self.last() + 1 <= self.budget


def check_matched(grid: BlockGrid, method: str) -> None:
    """Refuse a matched budget that leaves at most 2 blocks per tile where some tile is not dense: the forced
    first and diagonal blocks would be all it reads, with no choice of the method's own left."""
    if grid.capped and grid.n_keep <= 2 and not bool(grid.dense().all()):
        raise ValueError(f"{method} with peer_budget='matched' keeps at most {grid.n_keep} block(s) of "
                         f"{grid.size} keys per query tile at N_b={grid.budget} (the forced ones: nothing of "
                         f"{method} is left); use --peer-budget adaptive (the authors' setting) or a budget of "
                         f">= 3 blocks")


def cover_mask(values: torch.Tensor, fraction: float, first: torch.Tensor | None = None) -> torch.Tensor:
    """The smallest set of entries along the last dim whose values add up to `fraction` of the row's total,
    taken in decreasing order (entries marked in `first` come before all others). values: [..., n] >= 0;
    returns bool [..., n]. fraction = 1 keeps every entry up to the one that completes the total."""
    order = values if first is None else torch.where(first, float("inf"), values)
    index = order.argsort(dim=-1, descending=True)
    ranked = values.gather(-1, index)
    before = ranked.cumsum(-1) - ranked
    keep = before < fraction * values.sum(-1, keepdim=True)
    return torch.zeros_like(keep).scatter(-1, index, keep)


def within_mask(values: torch.Tensor, limit) -> torch.Tensor:
    """The entries along the last dim that, taken in decreasing order, keep the inclusive cumulative sum at or
    below `limit` (a number or a tensor broadcast over [..., 1]): FlexPrefill's official cover (the entry that
    crosses the limit is not kept, unlike cover_mask). values: [..., n] >= 0; returns bool [..., n]."""
    ranked, index = values.sort(dim=-1, descending=True)
    keep = ranked.cumsum(-1) <= limit
    return torch.zeros_like(keep).scatter(-1, index, keep)


def keep_blocks(rank: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Blocks per tile from a ranking. rank: [B, H, n_tiles, n_blocks], higher first, -inf = not wanted.

    Adds the always-kept blocks, drops blocks no query of the tile can see, keeps at most n_keep per tile (all
    wanted ones when the grid is not capped), and every visible block for dense tiles. Returns block numbers
    [B, H, n_tiles, W], ascending, -1 after.
    """
    forced = grid.forced()
    rank = torch.where(forced > 0, forced * _BIG, rank.float())
    rank = rank.masked_fill(~grid.visible(), float("-inf"))
    n = min(grid.n_keep, grid.n_blocks)
    top, chosen = torch.topk(rank, n, dim=-1)
    chosen = torch.where(top == float("-inf"), _NONE, chosen).sort(dim=-1).values
    chosen = torch.where(chosen == _NONE, -1, chosen)
    if not grid.capped:  # no cap: as many slots as the fullest tile uses
        chosen = chosen[..., :max(1, int((chosen >= 0).sum(-1).max()))]
    if grid.capped and grid.q_offset + min(grid.size, grid.num_queries) <= grid.budget:  # first tile is dense
        width = max(n, min(grid.n_blocks, (grid.budget - 1) // grid.size + 1))
        slots = torch.arange(width, device=chosen.device)
        everything = torch.where(slots[None, :] <= (grid.last() // grid.size)[:, None], slots[None, :], -1)
        if width > n:
            chosen = torch.nn.functional.pad(chosen, (0, width - n), value=-1)
        chosen = torch.where(grid.dense()[:, None], everything, chosen)
    return chosen


def token_selection(blocks: torch.Tensor, grid: BlockGrid) -> KernelSelection:
    """Token lists of a block choice: key_index [B, H, n_tiles, <= N_b], ascending, -1 after, each tile listing
    the keys of its blocks up to its last query (with counts, so the GPU kernel skips the unused slots)."""
    size = grid.size
    tokens = (blocks.clamp(min=0)[..., None] * size + torch.arange(size, device=blocks.device)).flatten(-2)
    valid = (blocks >= 0).repeat_interleave(size, dim=-1) & (tokens <= grid.last()[:, None])
    # Keys after the tile's last query lie in its highest listed block only, i.e. at the end of the list: cutting
    # the list to N_b slots drops no readable key (a non-dense tile lists n_keep * size <= N_b keys, a dense one
    # its last + 1 <= N_b visible keys).
    width = min(grid.budget, tokens.shape[-1])
    tokens = torch.where(valid, tokens, -1)[..., :width].contiguous()
    counts = valid[..., :width].sum(-1, dtype=torch.int32)
    return KernelSelection(tokens, size, grid.q_offset, counts=counts)


def block_selection(blocks: torch.Tensor, grid: BlockGrid) -> KernelSelection:
    """Block-mode selection for the GPU block kernel (utils/kernels/sparse_prefill.py): key_index lists block
    numbers. The kernel reads whole blocks of 16k keys; other sizes raise (use token_selection)."""
    if grid.size % 16:
        raise ValueError(f"the block kernel needs blocks of a multiple of 16 keys, got {grid.size}; "
                         "use a budget >= the block size and --block-size 128 (or 64, 32, 16)")
    counts = (blocks >= 0).sum(-1, dtype=torch.int32)
    return KernelSelection(blocks.contiguous(), grid.size, grid.q_offset, counts=counts, block_size=grid.size)


def method_selection(blocks: torch.Tensor, grid: BlockGrid, on_gpu: bool) -> KernelSelection:
    """What the registry methods return: on a GPU the block form when blocks are a multiple of 16 keys (the block
    kernel reads it; token lists of an uncapped selection grow as L^2 / block), else the token lists."""
    if on_gpu and grid.size % 16 == 0:
        return block_selection(blocks, grid)
    return token_selection(blocks, grid)


def reached(blocks: torch.Tensor, grid: BlockGrid) -> dict[str, torch.Tensor]:
    """What a block choice really reads (causal, exact): mean keys per query and query head, that over Lk (the
    density, comparable with N_b / L) and over the causally visible keys. 0-d fp64 tensors (no GPU sync)."""
    size, Lk = grid.size, grid.num_keys
    start = blocks.clamp(min=0) * size
    length = torch.clamp(Lk - start, max=size)
    first, last = grid.first()[:, None], grid.last()[:, None]

    def pairs_up_to(x):  # sum over queries at positions start .. x of the block keys each reads
        n = (x - start + 1).clamp(min=0)
        n_in = torch.minimum(n, length)
        return n_in * (n_in + 1) // 2 + (n - n_in) * length

    pairs = torch.where(blocks >= 0, pairs_up_to(last) - pairs_up_to(first - 1), 0).sum().double()
    B, H = blocks.shape[:2]
    rows = B * H * grid.num_queries
    visible = B * H * (grid.num_queries * (grid.q_offset + 1) + grid.num_queries * (grid.num_queries - 1) // 2)
    keys_read = pairs / rows
    return {"keys_read": keys_read, "density": keys_read / Lk, "causal_fraction": pairs / visible}


def reached_density(model) -> dict[str, float] | None:
    """Mean over a patched model's layers of what their last prefill read (REACHED records); None if no layer
    recorded one (a method that always reads its budget, or dense attention)."""
    records = [m.sparse_context.state[REACHED] for m in model.modules()
               if getattr(m, "sparse_context", None) is not None and REACHED in m.sparse_context.state]
    if not records:
        return None
    return {key: sum(float(r[key]) for r in records) / len(records) for key in records[0]}


def density_reached(model) -> float | None:
    """The density (keys read / Lk, causal, exact) of the patched model's last prefill, averaged over its
    layers, rounded to 4 digits, for a results record; None for methods that always read their budget."""
    record = reached_density(model)
    return None if record is None else round(record["density"], 4)


__all__ = ["BlockGrid", "check_matched", "cover_mask", "within_mask", "keep_blocks", "token_selection",
           "block_selection", "method_selection", "reached", "reached_density", "density_reached", "REACHED"]
