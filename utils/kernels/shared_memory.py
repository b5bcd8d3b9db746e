"""Shared memory per block that the Triton kernels' tile configs must fit: the current GPU's, or a forced value.

The tile configs (sparse_prefill.default_config, select.max_pooled_config) were tuned on an H100 (227 KB per block)
and shrink until they fit the GPU they run on: an RTX 3090 (Ampere sm_86) offers 99 KB, so it runs smaller tiles
and shallower pipelines. To run, and test (tests/test_kernels.py, test_cuda_rtx3090_configs), the configs of a
smaller GPU on any GPU, force its size:

    with shared_memory_limit(RTX_3090):        # or DHSA_SHARED_MEMORY=101376 in the environment
        out = sparse_attention(q, k, v, selection)

The configs' own accounting (tiles x stages) is conservative: compiled for sm_86 by Triton 3.6, the 3090 configs
use 24-82 KB (tests/test_kernels.py test_rtx3090_configs_compile_within_its_shared_memory checks each against
99 KB on any machine); the H100's fp32 scoring config would need 160 KB there.
"""

from __future__ import annotations

import contextlib
import os

import torch

from utils.kernels._interpreter import interpreting

RTX_3090 = 99 * 1024  # opt-in shared memory per block of sm_86 (RTX 30xx, A10, A40), bytes
H100 = 227 * 1024     # sm_90

_forced: list[int] = []


def shared_memory_per_block() -> int:
    """Bytes of shared memory a block may use: the innermost `shared_memory_limit`, else DHSA_SHARED_MEMORY, else the
    current GPU's opt-in maximum (an H100's without a GPU, e.g. under the Triton interpreter)."""
    if _forced:
        return _forced[-1]
    if os.environ.get("DHSA_SHARED_MEMORY"):
        value = os.environ["DHSA_SHARED_MEMORY"]
        if not value.isdigit() or int(value) < 16 * 1024:
            raise ValueError(f"DHSA_SHARED_MEMORY must be a number of bytes >= 16384, got {value!r}; "
                             f"e.g. {RTX_3090} for an RTX 3090")
        return int(value)
    if torch.cuda.is_available() and not interpreting():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", RTX_3090))
    return H100


@contextlib.contextmanager
def shared_memory_limit(nbytes: int):
    """Choose tile configs inside this block as for a GPU with `nbytes` of shared memory per block."""
    if nbytes < 16 * 1024:
        raise ValueError(f"shared memory per block must be >= 16384 bytes, got {nbytes}")
    _forced.append(int(nbytes))
    try:
        yield
    finally:
        _forced.pop()


def shrink_to_fit(cfg: dict, need, shared_memory: int | None, steps) -> dict:
    """cfg with its tile sizes reduced until need(cfg) bytes fit in shared_memory (default: shared_memory_per_block):
    steps is [(key, floor), ...] in order; "num_stages" goes down by one, every other key halves, none below its
    floor. The kernels' config functions share this so that every one shrinks the same way."""
    if shared_memory is None:
        shared_memory = shared_memory_per_block()
    for key, floor in steps:
        while need(cfg) > shared_memory and cfg[key] > floor:
            cfg[key] = cfg[key] - 1 if key == "num_stages" else cfg[key] // 2
    return cfg


__all__ = ["shared_memory_per_block", "shared_memory_limit", "shrink_to_fit", "RTX_3090", "H100"]
