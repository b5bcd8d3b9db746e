"""Triton kernel: sparse prefill attention that reads the selected keys in place (no gathered copy of K/V).

Input is a selection in the executor's format (utils/attention.py): queries cut into tiles of `query_chunk`
consecutive positions, and per tile and selection head an ascending list of key positions (token mode) or of
key-block numbers (block mode, whole blocks of `block_size` keys, App. D 2)). One program handles a slice of one
tile for all the query heads that share the list (the GQA group), so each K/V row it loads serves G query heads:

    rows of a program = G heads x M queries of one tile;   for each block of BLOCK_N listed keys:
        k, v <- rows of K/V at the listed positions (gathered row loads; in block mode on Hopper and later,
                one TMA bulk copy per run of BLOCK_N consecutive keys)
        online softmax over q k^T with the exact causal mask (key position <= query position)

Shapes: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; key_index [B, Hs, n_tiles, K] (Hs = Hkv or Hq, -1 = unused
slot); counts [B, Hs, n_tiles] int32 = listed slots to read (entries past it are ignored). Output [B, Hq, Lq, D]
in q's dtype. A query with no readable key gets 0 (as in the executor). Head dims: powers of two 16..256.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from utils.kernels._interpreter import interpreting
from utils.kernels.head_dims import HEAD_DIMS
from utils.kernels.shared_memory import shared_memory_per_block

try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634


@triton.jit
def _attend_step(acc, m_i, l_i, q, q_pos, k_src, v_src, b, kv_head, idx_base, step, count, Lk, stride_kl,
                 stride_vl, qk_scale, softcap, window, offs_n, dims, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 SOFTCAP: tl.constexpr, KEY_BLOCK: tl.constexpr, MASKED: tl.constexpr, WINDOW: tl.constexpr,
                 TMA: tl.constexpr):
    """One block of BLOCK_N listed keys: online-softmax update of (acc, m_i, l_i). MASKED=False only for
    blocks whose keys are all valid and precede every query of the program (no causal mask needed).
    k_src/v_src: the (batch, head) base pointers, or with TMA (block mode) tensor descriptors of all of K/V."""
    if KEY_BLOCK > 0:
        blk = tl.load(idx_base + step // (KEY_BLOCK // BLOCK_N))
        key = blk * KEY_BLOCK + (step % (KEY_BLOCK // BLOCK_N)) * BLOCK_N + offs_n
        key_ok = (key < Lk) & (blk >= 0)
    else:
        slot = step * BLOCK_N + offs_n
        key = tl.load(idx_base + slot, mask=slot < count, other=-1)
        key_ok = key >= 0
    if TMA:  # the BLOCK_N keys are consecutive: one bulk copy; rows past the end come back as zeros
        key0 = (blk * KEY_BLOCK + (step % (KEY_BLOCK // BLOCK_N)) * BLOCK_N).to(tl.int32)
        k = k_src.load([b, kv_head, key0, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        k = tl.load(k_src + key[:, None] * stride_kl + dims[None, :], mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_src + key[:, None] * stride_kl + dims[None, :])
    qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:  # Gemma-2: softcap * tanh(s / softcap); tanh(x) = 1 - 2 / (exp(2x) + 1)
        x = qk * (qk_scale / softcap)
        qk = softcap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)) * 1.4426950408889634
        scale = 1.0
    else:
        scale = qk_scale * 1.4426950408889634  # folded into the max and the exponent below (one FMA per score)
    if MASKED:
        visible = key_ok[None, :] & (key[None, :] <= q_pos[:, None])
        if WINDOW:  # sliding-window layers: only the last `window` positions
            visible = visible & (q_pos[:, None] - key[None, :] < window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    else:  # every key valid: the max is finite after this step
        m_use = m_new
    p = tl.exp2(qk * scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = v_src.load([b, kv_head, key0, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        v = tl.load(v_src + key[:, None] * stride_vl + dims[None, :], mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_src + key[:, None] * stride_vl + dims[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, Out, KeyIdx, Counts,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_ib, stride_ih, stride_it,
    stride_cb, stride_ch,
    num_sel_heads, sel_heads_per_kv, Lq, Lk, q_offset, qk_scale, softcap, window,
    T: tl.constexpr, G: tl.constexpr, G_P2: tl.constexpr, M_Q: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr, KEY_BLOCK: tl.constexpr,
    SORTED: tl.constexpr, WINDOW: tl.constexpr, TMA: tl.constexpr,
):
    tile = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    b = tl.program_id(1) // num_sel_heads
    s = tl.program_id(1) % num_sel_heads
    kv_head = s // sel_heads_per_kv

    # Row r of this program: query head s*G + r // M_Q, query part*M_Q + r % M_Q of the tile.
    rows = tl.arange(0, G_P2 * M_Q)
    g = rows // M_Q
    q_in_tile = part * M_Q + rows % M_Q
    q_idx = tile * T + q_in_tile
    row_ok = (g < G) & (q_in_tile < T) & (q_idx < Lq)
    q_pos = q_offset + q_idx
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + (s * G + g)[:, None] * stride_qh + q_idx[:, None] * stride_ql + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    if TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b * stride_kb + kv_head * stride_kh
        v_src = V + b * stride_vb + kv_head * stride_vh
    idx_base = KeyIdx + b * stride_ib + s * stride_ih + tile * stride_it
    count = tl.load(Counts + b * stride_cb + s * stride_ch + tile)
    if KEY_BLOCK > 0:  # block mode: each listed block is KEY_BLOCK // BLOCK_N steps of BLOCK_N keys
        steps = count * (KEY_BLOCK // BLOCK_N)
    else:
        steps = tl.cdiv(count, BLOCK_N)

    # With an ascending list, the leading entries below the program's first query need no mask: find how
    # many by bisection, and run those blocks on the unmasked path.
    safe_steps = 0
    if SORTED:
        first_query = q_offset + tile * T + part * M_Q
        lo = count * 0
        hi = count
        for _ in range(32):
            mid = (lo + hi) // 2
            entry = tl.load(idx_base + mid, mask=mid < count, other=0)
            last_key = entry * KEY_BLOCK + KEY_BLOCK - 1 if KEY_BLOCK > 0 else entry
            below = (mid < hi) & (entry >= 0) & (last_key < first_query)
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below | (mid >= hi), hi, mid)
        if KEY_BLOCK > 0:
            safe_steps = lo * (KEY_BLOCK // BLOCK_N)
        else:
            safe_steps = lo // BLOCK_N

    m_i = tl.full([G_P2 * M_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_P2 * M_Q], dtype=tl.float32)
    acc = tl.zeros([G_P2 * M_Q, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for step in range(0, safe_steps):
        acc, m_i, l_i = _attend_step(acc, m_i, l_i, q, q_pos, k_src, v_src, b, kv_head, idx_base, step, count, Lk,
                                     stride_kl, stride_vl, qk_scale, softcap, window, offs_n, dims, BLOCK_N, HEAD_DIM,
                                     SOFTCAP, KEY_BLOCK, False, WINDOW, TMA)
    for step in range(safe_steps, steps):
        acc, m_i, l_i = _attend_step(acc, m_i, l_i, q, q_pos, k_src, v_src, b, kv_head, idx_base, step, count, Lk,
                                     stride_kl, stride_vl, qk_scale, softcap, window, offs_n, dims, BLOCK_N, HEAD_DIM,
                                     SOFTCAP, KEY_BLOCK, True, WINDOW, TMA)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b * stride_ob + (s * G + g)[:, None] * stride_oh + q_idx[:, None] * stride_ol + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need sm90+, 16-byte aligned bases and strides (all but the last, which must be 1)."""
    if TensorDescriptor is None or interpreting() or not all(t.is_cuda for t in tensors):
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def default_config(head_dim: int, group: int, block_mode: bool = False, shared_memory: int | None = None) -> dict:
    """Tile shape per head dim: rows (G heads x M queries) per program, keys per step, warps, pipeline depth, and
    whether block mode reads K/V through TMA descriptors. The head-dim-128 choices were measured on an H100 at 128K
    tokens (notes/kernel_notes.md). shared_memory (bytes per block, default: the current GPU's, or the one forced by
    utils/kernels/shared_memory.py) shrinks the pipeline, then the rows, until the tiles fit: Q (rows x D) plus
    num_stages K/V tiles (2 x block_n x D), 16-bit. An RTX 3090 (99 KB) gets, at head dim 128, rows 128, 8 warps and
    2 stages (token mode) and rows 128, 4 warps (block mode, no TMA before sm_90)."""
    if head_dim <= 64:
        cfg = dict(rows=128, block_n=64, num_warps=4, num_stages=3)
    elif head_dim <= 128:
        if block_mode:
            cfg = dict(rows=256, block_n=64, num_warps=8, num_stages=2, tma=True)
        else:
            cfg = dict(rows=256, block_n=64, num_warps=16, num_stages=5)
    else:
        cfg = dict(rows=64, block_n=32, num_warps=4, num_stages=2)
    if shared_memory is None:
        shared_memory = shared_memory_per_block()
    need = lambda c: 2 * head_dim * (c["rows"] + 2 * c["num_stages"] * c["block_n"])  # noqa: E731
    while need(cfg) > shared_memory and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while need(cfg) > shared_memory and cfg["rows"] > 64:
        cfg["rows"] //= 2
        cfg["num_warps"] = max(4, cfg["num_warps"] // 2)
    return cfg


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_index: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    query_chunk: int,
    q_offset: int = 0,
    scale: float | None = None,
    softcap: float | None = None,
    block_size: int | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    sorted_keys: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """Sparse causal attention over listed keys. Shapes in the module docstring; returns [B, Hq, Lq, D].

    key_index lists token positions, or block numbers when `block_size` is given (then counts = listed blocks).
    counts: [B, Hs, n_tiles]; None reads every slot (slots < 0 are skipped either way).
    config: overrides of `default_config` (rows, block_n, num_warps, num_stages, tma). out: optional [B, Hq, Lq, D]
    buffer to write into (tests poison it first). sorted_keys: the lists are ascending with unused slots last
    (as every KernelSelection is); the kernel then skips the causal mask on the blocks below the tile.
    window: also drop keys with q_pos - k_pos >= window (sliding-window layers; every block is then masked).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    Hs, n_tiles, K = key_index.shape[1], key_index.shape[2], key_index.shape[3]
    T = query_chunk
    if D not in HEAD_DIMS or v.shape[-1] != D:
        raise ValueError(f"sparse_prefill supports head dims 16..256 (powers of two, Dv == D); got {D}, {v.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"sparse_prefill needs q, k, v of one dtype (fp16/bf16/fp32); got {q.dtype}, {k.dtype}")
    if Hq % Hs or Hs % Hkv or n_tiles != math.ceil(Lq / T) or key_index.shape[0] != B:
        raise ValueError(f"key_index {tuple(key_index.shape)} does not fit q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"query_chunk={T}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or key_index.stride(-1) != 1:
        q, k, v, key_index = (t.contiguous() for t in (q, k, v, key_index))
    G = Hq // Hs
    if counts is None:
        counts = torch.full((B, Hs, n_tiles), K, dtype=torch.int32, device=q.device)
    counts = counts.to(torch.int32)
    cfg = dict(default_config(D, G, block_size is not None), **(config or {}))
    G_P2 = triton.next_power_of_2(G)
    block_n = cfg["block_n"]
    if block_size is not None:
        if block_size % block_n:
            block_n = math.gcd(block_size, block_n)
        if block_n < 16:
            raise ValueError(f"block_size {block_size} must be a multiple of 16")
    # Queries per program: enough rows for the matrix units (>= 16), at most the tile.
    m_q = max(1, cfg["rows"] // G_P2)
    m_q = min(m_q, triton.next_power_of_2(T))
    m_q = max(m_q, triton.cdiv(16, G_P2))
    split = triton.cdiv(T, m_q)
    if out is None:
        out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor with a contiguous last dim")
    scale = D ** -0.5 if scale is None else scale
    grid = (n_tiles * split, B * Hs)
    k_arg, v_arg = k, v
    tma = bool(cfg.get("tma")) and block_size is not None and _tma_usable(k, v)
    if tma:  # block mode: whole runs of BLOCK_N keys through the TMA engine (Hopper and later)
        k_arg, v_arg = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, D]) for t in (k, v))
    _sparse_prefill_kernel[grid](
        q, k_arg, v_arg, out, key_index, counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        key_index.stride(0), key_index.stride(1), key_index.stride(2),
        counts.stride(0), counts.stride(1),
        Hs, Hs // Hkv, Lq, Lk, q_offset, float(scale), float(softcap or 1.0), int(window or 0),
        T=T, G=G, G_P2=G_P2, M_Q=m_q, SPLIT=split, BLOCK_N=block_n, HEAD_DIM=D,
        SOFTCAP=softcap is not None, KEY_BLOCK=block_size or 0, SORTED=sorted_keys and window is None,
        WINDOW=window is not None, TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


__all__ = ["sparse_prefill", "default_config"]
