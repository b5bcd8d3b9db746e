"""Block-aligned sparse attention through PyTorch FlexAttention, as an alternative to the Triton block kernel
(the faster one is picked by measurement, notes/kernel_notes.md). Input: a block-mode KernelSelection
(utils/methods/dhsa/fused.py `dhsa_block_select`), query tiles of one block. Blocks strictly below the diagonal are
passed as full blocks (no mask evaluated), the diagonal block as a partial block with the causal mask.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from utils.selection import KernelSelection

_compiled = {}


def _flex():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["fn"]


def block_mask_from_selection(selection: KernelSelection, num_q_heads: int, num_queries: int,
                              num_keys: int) -> BlockMask:
    """FlexAttention BlockMask of a block-mode selection; heads expanded to the query heads."""
    bs = selection.block_size
    idx, counts = selection.key_index, selection.counts
    B, Hs, n_tiles, K = idx.shape
    group = num_q_heads // Hs
    q_block = selection.q_offset // bs + torch.arange(n_tiles, device=idx.device)
    listed = (torch.arange(K, device=idx.device) < counts[..., None]) & (idx >= 0)
    diagonal = listed & (idx == q_block[:, None])
    below = listed & (idx < q_block[:, None])
    big = torch.iinfo(torch.int32).max
    n_kv_blocks = -(-num_keys // bs)  # FlexAttention wants index rows as wide as the number of key blocks

    def compact(keep):
        order = torch.where(keep, idx, big).to(torch.int32).sort(dim=-1).values
        order = torch.where(order == big, 0, order)
        order = torch.nn.functional.pad(order, (0, max(0, n_kv_blocks - K)))[..., :n_kv_blocks]
        return keep.sum(-1, dtype=torch.int32).repeat_interleave(group, 1), order.repeat_interleave(group, 1)

    partial_num, partial_idx = compact(diagonal)
    full_num, full_idx = compact(below)
    offset = selection.q_offset
    # The mask_mod also looks the block up in the selection, so that the mask is exact wherever it is evaluated
    # (FlexAttention's eager CPU path evaluates it everywhere; the compiled kernel only on the diagonal blocks).
    listed_blocks = torch.zeros(B, Hs, n_tiles, n_kv_blocks + 1, dtype=torch.bool, device=idx.device)
    listed_blocks.scatter_(-1, torch.where(listed, idx, n_kv_blocks), True)

    def causal(b, h, q_idx, kv_idx):
        return (q_idx + offset >= kv_idx) & listed_blocks[b, h // group, q_idx // bs, kv_idx // bs]

    return BlockMask.from_kv_blocks(partial_num, partial_idx.contiguous(), full_num, full_idx.contiguous(),
                                    BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(num_queries, num_keys))


def flex_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: KernelSelection, *,
                         scale: float | None = None, block_mask: BlockMask | None = None) -> torch.Tensor:
    """q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] -> [B, Hq, Lq, D]. No soft-capping (use the Triton kernel)."""
    if block_mask is None:
        block_mask = block_mask_from_selection(selection, q.shape[1], q.shape[2], k.shape[2])
    attend = _flex() if q.is_cuda else flex_attention  # eager reference on the CPU (tests)
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


__all__ = ["block_mask_from_selection", "flex_block_attention"]
