"""`KernelSelection`: a Selection (utils/attention.py) with what the GPU kernels need besides the key lists.
Kept free of Triton so that code without Triton can recognise it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import Selection


@dataclass
class KernelSelection(Selection):
    """counts: [B, Hs, n_tiles] int32, listed entries per tile (trailing slots are -1).
    block_size: None when key_index lists token positions; else key_index lists key-block numbers (whole blocks
    of `block_size` keys, App. D 2)) and `sparse_attention` runs it through the block kernel (or converts it to
    token lists for the reference path)."""

    counts: torch.Tensor | None = None
    block_size: int | None = None


__all__ = ["KernelSelection"]
