"""What a sparse method decides: which keys each query may read (`Selection`), and its GPU form (`KernelSelection`).

A method's selection rule returns a Selection; `utils.attention.sparse_attention` runs the attention on it. The
queries are cut into tiles of `query_chunk` consecutive queries, and every tile lists, ascending, the keys it may
read (shared by the tile's queries, so K/V are gathered once per tile, as in the paper's SDPA kernel, App. D); -1
marks an unused slot at the end of a row. On top of the list each query obeys causality and, optionally, a
per-query rule (a sliding window, a dilation pattern, ...). Queries sit at positions `q_offset + arange(Lq)`.

Plain data and PyTorch only: the methods, the executors and the Triton kernels all import it, and it imports no
other module of the project.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

# A per-query rule: keep(q_pos, k_pos) -> bool, broadcasting q_pos [..., T, 1] against k_pos [..., 1, K].
KeepRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Selection:
    """The keys each query may read.

    key_index: [B, Hs, n_tiles, K] int64. Row t lists, ascending, the keys that query tile t (queries
        t*T .. t*T+T-1) may read; -1 marks an unused slot. Hs is Hkv (the heads of a GQA group share one list)
        or Hq (one list per query head).
    query_chunk: T, the number of queries per tile (1 for per-query selections).
    q_offset: absolute position of query 0.
    keep: optional extra per-query rule keep(q_pos, k_pos) -> bool, applied on top of causality. q_pos and
        k_pos are absolute positions; k_pos has the shape of the gathered keys [B, Hs, g, 1, K] so a rule may
        depend on the head; q_pos is [g, T, 1].
    window: optional sliding window: keys with q_pos - k_pos >= window are dropped too (Gemma-2/3 local
        layers). Unlike `keep`, the GPU kernel applies it, so windowed layers run on the kernel.
    dense_from: optional query index (a multiple of query_chunk): the queries from there on read every key
        before them, whatever key_index lists for their tiles (DHSA's dense question tail: the one stated
        exception to the per-query budget). None: every query reads only its tile's list.
    """

    key_index: torch.Tensor
    query_chunk: int
    q_offset: int = 0
    keep: KeepRule | None = None
    window: int | None = None
    dense_from: int | None = None

    @property
    def max_keys(self) -> int:
        return self.key_index.shape[-1]

    def mask(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """Dense boolean mask [B, Hs, Lq, Lk] of the (query, key) pairs read. For tests and plots (small L only)."""
        B, Hs, n_tiles, K = self.key_index.shape
        T = self.query_chunk
        if n_tiles != math.ceil(num_queries / T):
            raise ValueError(f"selection has {n_tiles} tiles, {num_queries} queries need {math.ceil(num_queries / T)}")
        idx = self.key_index
        tile_mask = torch.zeros(B, Hs, n_tiles, num_keys + 1, dtype=torch.bool, device=idx.device)
        tile_mask.scatter_(-1, torch.where(idx < 0, num_keys, idx), True)
        tile_mask = tile_mask[..., :num_keys]
        mask = tile_mask.repeat_interleave(T, dim=2)[:, :, :num_queries]  # [B, Hs, Lq, Lk]
        q_pos = self.q_offset + torch.arange(num_queries, device=idx.device)
        k_pos = torch.arange(num_keys, device=idx.device)
        mask &= (k_pos[None, :] <= q_pos[:, None])
        if self.keep is not None:
            rule = self.keep(q_pos.view(1, num_queries, 1), k_pos.expand(B, Hs, 1, 1, num_keys))
            mask &= rule.reshape(rule.shape[:-3] + (num_queries, num_keys)) if rule.dim() == 5 else rule
        if self.window is not None:
            mask &= (q_pos[:, None] - k_pos[None, :] < self.window)
        if self.dense_from is not None:
            mask[:, :, self.dense_from:] = (k_pos[None, :] <= q_pos[self.dense_from:, None])
        return mask

    def budget_rows(self, num_queries: int) -> int:
        """How many leading queries read only their tile's list (so at most max_keys keys): all but a dense tail."""
        return num_queries if self.dense_from is None else min(num_queries, self.dense_from)

    def sparse_part(self) -> "Selection":
        """The tiles before `dense_from` (all of them when it is None), as a selection without a dense tail."""
        if self.dense_from is None:
            return self
        n = self.dense_from // self.query_chunk
        parts = {"key_index": self.key_index[:, :, :n], "dense_from": None}
        if getattr(self, "counts", None) is not None:
            parts["counts"] = self.counts[:, :, :n]
        return dataclasses.replace(self, **parts)


@dataclass
class KernelSelection(Selection):
    """A Selection with what the GPU kernels need besides the key lists (utils/kernels; no Triton needed here).

    counts: [B, Hs, n_tiles] int32, listed entries per tile (trailing slots are -1).
    block_size: None when key_index lists token positions; else key_index lists key-block numbers (whole blocks
    of `block_size` keys, App. D 2)) and `sparse_attention` runs it through the block kernel (or, on the PyTorch
    path, as the token lists of `block_selection_to_tokens`)."""

    counts: torch.Tensor | None = None
    block_size: int | None = None


def full_selection(batch: int, heads: int, num_queries: int, num_keys: int, query_chunk: int,
                   device=None) -> Selection:
    """A selection that lists every causally visible key for each tile (equals dense attention)."""
    n_tiles = math.ceil(num_queries / query_chunk)
    q_offset = num_keys - num_queries
    ends = q_offset + torch.clamp(torch.arange(1, n_tiles + 1, device=device) * query_chunk, max=num_queries)
    idx = torch.arange(num_keys, device=device).expand(n_tiles, num_keys)
    idx = torch.where(idx < ends[:, None], idx, -1)
    return Selection(idx.expand(batch, heads, n_tiles, num_keys).clone(), query_chunk, q_offset)


def block_selection_to_tokens(selection: KernelSelection, num_keys: int) -> Selection:
    """Token lists of a block-mode selection (for the reference executor and tests). Small L only."""
    bs = selection.block_size
    idx = selection.key_index
    slots = torch.arange(idx.shape[-1], device=idx.device)
    valid = (idx >= 0) & (slots < selection.counts[..., None])
    tokens = (idx.clamp(min=0)[..., None] * bs + torch.arange(bs, device=idx.device)).flatten(-2)
    tokens = torch.where(valid.repeat_interleave(bs, -1) & (tokens < num_keys), tokens, -1)
    return Selection(tokens, selection.query_chunk, selection.q_offset)


def blocks_from_token_selection(selection: Selection, block_size: int, num_keys: int) -> KernelSelection | None:
    """The block-mode form of a token selection made of whole aligned blocks (e.g. the block_sparse baseline),
    so that it runs through the block kernel; None if some listed run is not a whole aligned block."""
    idx = selection.key_index
    K = idx.shape[-1]
    if selection.keep is not None or K % block_size or selection.query_chunk % block_size:
        return None
    runs = idx.view(*idx.shape[:-1], K // block_size, block_size)
    first = runs[..., :1]
    expected = first + torch.arange(block_size, device=idx.device)
    # A -1 inside a run is fine only where the block kernel's causal mask drops that key anyway.
    tile_last = selection.q_offset + (torch.arange(idx.shape[2], device=idx.device) + 1) * selection.query_chunk - 1
    hidden = (runs < 0) & ((expected > tile_last[:, None, None]) | (expected >= num_keys))
    whole = (first >= 0) & (first % block_size == 0) & ((runs == expected) | hidden).all(-1, keepdim=True)
    unused = (runs < 0).all(-1, keepdim=True)
    if not bool((whole | unused).all()):
        return None
    big = torch.iinfo(torch.long).max
    blocks = torch.where(unused[..., 0], big, first[..., 0] // block_size).sort(dim=-1).values
    blocks = torch.where(blocks == big, -1, blocks)  # ascending, unused slots last
    counts = (blocks >= 0).sum(-1, dtype=torch.int32)
    return KernelSelection(blocks.contiguous(), selection.query_chunk, selection.q_offset, counts=counts,
                           block_size=block_size)


__all__ = ["Selection", "KeepRule", "KernelSelection", "full_selection", "block_selection_to_tokens",
           "blocks_from_token_selection"]
