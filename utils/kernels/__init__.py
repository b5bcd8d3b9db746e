"""GPU fast paths for DHSA prefill (Triton): attention that reads the selected keys in place, and the fused
top-N_b selection. `utils.attention.sparse_attention` and `utils.dhsa.dhsa_select` (the only callers) ask
`try_sparse_attention` and `try_dhsa_select` first on CUDA tensors; each returns None when its kernel does not
apply (then the PyTorch path runs), so results never depend on whether Triton is installed. The conditions under
which a kernel applies are written here and nowhere else.

Switch off with the environment variable DHSA_KERNELS=0, or `with kernels.disabled(): ...` (tests use it to get
the PyTorch path on the same inputs).

    sparse_prefill.py   attention kernel (token lists, or whole key blocks for the block-aligned path)
    select.py           fused DHSA selection (token and block-aligned)
    flex.py             block-aligned attention through PyTorch FlexAttention (latency comparison)

Imports: utils.selection, utils.dhsa_math and utils.config only (never the PyTorch executors that call it).
Triton itself is imported inside the functions, so this package loads without it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..config import DHSAOptions
from ..selection import KernelSelection

_state = {"enabled": os.environ.get("DHSA_KERNELS", "1") != "0"}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    return _state["enabled"]


def set_enabled(flag: bool) -> None:
    _state["enabled"] = bool(flag)


@contextlib.contextmanager
def disabled():
    """Run the PyTorch reference paths inside this block."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def _usable(t: torch.Tensor) -> bool:
    return t.is_cuda and _state["enabled"] and triton_available()


def selection_counts(key_index: torch.Tensor) -> torch.Tensor:
    """Slots to read per tile: one past the last used slot. key_index [..., K] -> [...] int32."""
    slots = torch.arange(1, key_index.shape[-1] + 1, device=key_index.device, dtype=torch.int32)
    return torch.where(key_index >= 0, slots, 0).amax(-1).to(torch.int32)


def try_sparse_attention(q, k, v, selection, *, scale=None, softcap=None):
    """The Triton kernel's output for `sparse_attention(q, k, v, selection, ...)`, or None where it does not
    apply (CPU tensors, fp32, per-query rules, decode steps, unsupported head dims)."""
    D = q.shape[-1]
    Hq, Hkv, Hs = q.shape[1], k.shape[1], selection.key_index.shape[1]
    applies = (_usable(q) and selection.keep is None and q.dtype in (torch.float16, torch.bfloat16)
               and k.dtype == q.dtype and v.dtype == q.dtype and D in (16, 32, 64, 128, 256) and v.shape[-1] == D
               and q.shape[2] >= 16 and Hq % Hs == 0 and Hs % Hkv == 0)
    if not applies:
        return None
    from .sparse_prefill import sparse_prefill

    counts = getattr(selection, "counts", None)
    if counts is None:
        counts = selection_counts(selection.key_index)
    return sparse_prefill(q, k, v, selection.key_index, counts, query_chunk=selection.query_chunk,
                          q_offset=selection.q_offset, scale=scale, softcap=softcap,
                          block_size=getattr(selection, "block_size", None),
                          sorted_keys=isinstance(selection, KernelSelection), window=selection.window)


def try_dhsa_select(q, k, *, budget: int, boundaries: list[torch.Tensor], options: DHSAOptions):
    """The fused selection for `utils.dhsa.dhsa_select` (same arguments), or None where it does not apply: it
    scores summed GQA groups (head_pooling "mean"), does not rescore tokens (dhsa_select adds an exact tail itself), and holds at most MAX_CHUNKS chunk scores per tile."""
    from .select import MAX_CHUNKS, dhsa_select_fused

    if not _usable(q) or options.head_pooling != "mean" or options.token_rescore or options.exact_tail \
            or max(int(e.numel()) for e in boundaries) > MAX_CHUNKS:
        return None
    return dhsa_select_fused(q, k, budget=budget, boundaries=boundaries, options=options)


__all__ = ["try_sparse_attention", "try_dhsa_select", "enabled", "set_enabled", "disabled", "triton_available",
           "selection_counts"]
