"""GPU fast path of the executor (Triton): attention that reads the selected keys in place.
`utils.attention.sparse_attention` (the only caller) asks `try_sparse_attention` first on CUDA tensors; it returns
None when the kernel does not apply (then the PyTorch path runs), so results never depend on whether Triton is
installed. The conditions under which the attention kernel applies are written here; `usable` is the device gate
that every fast path shares (DHSA's fused selection, utils/methods/dhsa/fused.py, asks it through
`utils.methods.dhsa.select.try_fused_select`).

Switch off with the environment variable DHSA_KERNELS=0, or `with kernels.disabled(): ...` (tests use it to get
the PyTorch path on the same inputs).

    sparse_prefill.py   attention kernel (token lists, or whole key blocks for the block-aligned path)
    flex.py             block-aligned attention through PyTorch FlexAttention (latency comparison)
    shared_memory.py    the GPU's shared memory per block (tile sizes)

Imports: utils.selection only (it reads a Selection, nothing else; never the PyTorch executors that call it).
Triton itself is imported inside the functions, so this package loads without it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from utils.kernels.head_dims import HEAD_DIMS
from utils.selection import KernelSelection

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


def usable(t: torch.Tensor) -> bool:
    """Whether a kernel may run on `t` at all: a CUDA tensor, kernels enabled, Triton installed."""
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
    applies = (usable(q) and selection.keep is None and q.dtype in (torch.float16, torch.bfloat16)
               and k.dtype == q.dtype and v.dtype == q.dtype and D in HEAD_DIMS and v.shape[-1] == D
               and q.shape[2] >= 16 and Hq % Hs == 0 and Hs % Hkv == 0)
    if not applies:
        return None
    from utils.kernels.sparse_prefill import sparse_prefill

    counts = getattr(selection, "counts", None)
    if counts is None:
        counts = selection_counts(selection.key_index)
    return sparse_prefill(q, k, v, selection.key_index, counts, query_chunk=selection.query_chunk,
                          q_offset=selection.q_offset, scale=scale, softcap=softcap,
                          block_size=getattr(selection, "block_size", None),
                          sorted_keys=isinstance(selection, KernelSelection), window=selection.window)


__all__ = ["try_sparse_attention", "usable", "enabled", "set_enabled", "disabled", "triton_available",
           "selection_counts"]
