"""Sort and top-k along the last dimension, through numpy on the CPU.

The selection sorts and ranks many short rows (a tile's key list, its chunk scores, a band of candidates), and for
those torch's CPU kernels are slow: on this project's 2-core box torch.sort took 6.6x numpy's time on 14 rows of
2,048 keys and 2.4x on the 14 x 256 key lists of a 16K prefill; torch.topk took ~2x np.argpartition (README,
Latency, CPU). np.sort runs SIMD sorting networks; np.argpartition is an introselect. Both read torch's memory
in place (a CPU tensor's .numpy() is a view). CUDA tensors, other dtypes and rows holding a NaN (which numpy and
torch order differently) stay on torch, so the results are torch's wherever these are not.

Ties: like torch.topk, `topk` keeps some k of the tied values at the cut, not necessarily the same ones; callers
that need a unique set check the cut themselves (select.py's whole-chunk paths do).

    sort(torch.tensor([[3, 1, 2]]))                      # tensor([[1, 2, 3]])
    topk(torch.tensor([[0.1, 0.9, 0.5]]), 2, best_first=True)  # (tensor([[0.9, 0.5]]), tensor([[1, 2]]))
"""

from __future__ import annotations

import numpy as np
import torch

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def _on_numpy(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and x.dim() > 0 and x.shape[-1] > 1 \
        and not (x.is_floating_point() and bool(torch.isnan(x).any()))


def sort(x: torch.Tensor) -> torch.Tensor:
    """x sorted ascending along its last dimension (values only), as torch.sort(x, -1).values."""
    if not _on_numpy(x):
        return torch.sort(x, dim=-1).values
    return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))


def topk(x: torch.Tensor, k: int, best_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries along the last dimension, as torch.topk(x, k, -1,
    sorted=best_first): in no particular order unless best_first (then largest first)."""
    n = x.shape[-1] if x.dim() else 1
    if not 0 <= k <= n:
        raise ValueError(f"topk: k = {k} is outside 0 .. {n}, the length of the last dimension")
    if not _on_numpy(x) or not x.is_floating_point() or k == 0:
        return torch.topk(x, k, dim=-1, sorted=best_first)
    x = x.detach()
    if k < n:  # argpartition puts the smallest first; negating keeps +-inf in order
        picked = torch.from_numpy(np.argpartition(-x.numpy(), k - 1, axis=-1))[..., :k]
    else:
        picked = torch.arange(n).expand(x.shape)
    values = torch.gather(x, -1, picked)  # (torch's gather: np.take_along_axis took as long as the partition)
    if best_first:
        order = torch.from_numpy(np.argsort(-values.numpy(), axis=-1))
        picked, values = torch.gather(picked, -1, order), torch.gather(values, -1, order)
    return values, picked  # (a view of the partition: .contiguous() if you need one)


__all__ = ["sort", "topk"]
