"""Token rescoring on the GPU: the hierarchical refinement of utils.methods.dhsa.select._rescore_tokens by two
Triton programs per (query tile, selecting head), for the fused selection (utils/methods/dhsa/fused.py).

What it keeps. A tile's W candidates (its best chunks by S_c, from pick_keys at budget W) are rescored key by key:
R sampled queries of the tile (evenly spaced back from its last query; every query when R = T), and every query
head of the GQA group, each take a causal softmax over the candidates; a candidate's weight is the largest it gets
from any of those rows. The tile keeps its sink and local keys (forced_key_counts of N_b) and the best of the rest
by weight, N_b keys in all, written in ascending order with -1 after.

    rescore_weights   pass 1: each row's log-sum-exp over the candidates (online, as flash attention);
                      pass 2: weight = max over rows of (logit - lse), +inf forced, -inf invisible -> [H, n, W]
                      (the logits gathered and multiplied again, or read back from pass 1 where that is faster)
    keep_best         per tile: the weight threshold by bisection on its bits (as pick_keys), ties in key
                      order, the kept candidates compacted in place -> key_index [H, n, N_b], counts

Equal to `_rescore_tokens` up to rounding of the logits (bf16 inputs, fp32 sums) and ties (tests/test_kernels.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from utils.kernels.head_dims import HEAD_DIMS
from utils.kernels.shared_memory import shrink_to_fit

MAX_CANDIDATES = 32768  # one tile's weights live in registers while keep_best ranks them
LOGITS_BYTES = 1 << 30  # rescore_weights keeps pass 1's logits for pass 2 when they fit in this (a layer's worth)
KEEP_LOGITS_HEAD_DIM = 128  # ... and the head dim is at least this (rescore_candidates says why)


@triton.jit
def forced_counts(tile_budget, sink_tokens, local_tokens):
    """(local, sink) keys always kept by a tile of this budget: utils.methods.dhsa.scores.forced_key_counts."""
    local = tl.minimum(tile_budget // 2, local_tokens)
    sink = tl.minimum((tile_budget - local) // 2, sink_tokens)
    if sink_tokens > 0:
        sink = tl.maximum(sink, tl.minimum(tile_budget - local, 1))
    return local, sink


@triton.jit
def _candidate_logits(q, q_pos, row_ok, cand_row, keys, stride_kl, dims, cols, W, scale, IEEE: tl.constexpr):
    """One block of candidates: their keys gathered, the rows' scaled logits, and which (row, candidate) pairs are
    causal and real. Returns (idx [BLOCK_W], logits [ROWS, BLOCK_W], seen [ROWS, BLOCK_W])."""
    idx = tl.load(cand_row + cols, mask=cols < W, other=-1)
    k = tl.load(keys + tl.maximum(idx, 0)[:, None] * stride_kl + dims[None, :], mask=(idx >= 0)[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    seen = row_ok[:, None] & (idx[None, :] >= 0) & (idx[None, :] <= q_pos[:, None])
    return idx, s, seen


@triton.jit
def _rescore_weights_kernel(
    Q, K, Cand, Weight, Logits,
    stride_qh, stride_ql, stride_kh, stride_kl, stride_ch, stride_ct, stride_wh, stride_wt, stride_lh, stride_lt,
    Lq, q_offset, budget, sink_tokens, local_tokens, W, G, T, R, step, scale,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, IEEE: tl.constexpr, KEEP: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    first = tile * T
    last = tl.minimum(first + T, Lq) - 1
    end = q_offset + last + 1  # keys visible to the tile's last query
    local, sink = forced_counts(tl.minimum(end, budget), sink_tokens, local_tokens)

    cand_row = Cand + h.to(tl.int64) * stride_ch + tile.to(tl.int64) * stride_ct
    out_row = Weight + h.to(tl.int64) * stride_wh + tile.to(tl.int64) * stride_wt
    keys = K + h.to(tl.int64) * stride_kh
    kept = Logits + h.to(tl.int64) * stride_lh + tile.to(tl.int64) * stride_lt  # [ROWS, W] when KEEP
    dims = tl.arange(0, HEAD_DIM)
    # rows: query head g of the group x sampled query j (j = 0 is the tile's last query), ROWS at a time; a later
    # slice of rows keeps the best of its weights and those the earlier slices wrote
    for r0 in range(0, G * R, ROWS):
        r = r0 + tl.arange(0, ROWS)
        row_ok = r < G * R
        g = r // R
        pos = tl.maximum(last - (r % R) * step, first)
        q = tl.load(Q + (h * G + g).to(tl.int64)[:, None] * stride_qh + pos[:, None] * stride_ql + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        q_pos = q_offset + pos

        # pass 1: log-sum-exp of each row over the candidates it sees
        if KEEP:
            tl.debug_barrier()  # the previous slice's pass 2 has read the logits this one overwrites
        m = tl.full([ROWS], float("-inf"), tl.float32)
        acc = tl.zeros([ROWS], tl.float32)
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            idx, s, seen = _candidate_logits(q, q_pos, row_ok, cand_row, keys, stride_kl, dims, cols, W, scale, IEEE)
            s = tl.where(seen, s, float("-inf"))
            if KEEP:  # pass 2 reads these back instead of gathering the keys again
                lane = tl.arange(0, ROWS)
                tl.store(kept + lane[:, None] * W + cols[None, :], s, mask=row_ok[:, None] & (cols < W)[None, :])
            m_new = tl.maximum(m, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
            m = m_new
        # a row that sees nothing (a padded row) gets lse = +inf: its weights are -inf below
        lse = tl.where(m == float("-inf"), float("inf"), m + tl.log(tl.where(m == float("-inf"), 1.0, acc)))

        # pass 2: each candidate's best weight over the rows, in log space
        tl.debug_barrier()  # the previous slice's weights are written before this one reads them
        for w0 in range(0, W, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            if KEEP:
                lane = tl.arange(0, ROWS)
                idx = tl.load(cand_row + cols, mask=cols < W, other=-1)
                s = tl.load(kept + lane[:, None] * W + cols[None, :], mask=row_ok[:, None] & (cols < W)[None, :],
                            other=float("-inf"))
                best = tl.max(s - lse[:, None], 0)
            else:
                idx, s, seen = _candidate_logits(q, q_pos, row_ok, cand_row, keys, stride_kl, dims, cols, W, scale,
                                                 IEEE)
                best = tl.max(tl.where(seen, s - lse[:, None], float("-inf")), 0)
            if r0 > 0:
                best = tl.maximum(best, tl.load(out_row + cols, mask=cols < W, other=float("-inf")))
            forced = (idx >= 0) & ((idx < sink) | (idx >= end - local))
            best = tl.where(forced, float("inf"), best)
            best = tl.where(idx >= 0, best, float("-inf"))
            tl.store(out_row + cols, best, mask=cols < W)


@triton.jit
def _keep_best_kernel(
    Weight, Cand, KeyIdx, Counts,
    stride_wh, stride_wt, stride_ch, stride_ct, stride_ih, stride_it, stride_nh,
    W, budget, num_slots,
    W_P2: tl.constexpr, FILL: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.arange(0, W_P2)
    in_range = c < W
    weight = tl.load(Weight + h.to(tl.int64) * stride_wh + tile.to(tl.int64) * stride_wt + c, mask=in_range,
                     other=float("-inf"))
    idx = tl.load(Cand + h.to(tl.int64) * stride_ch + tile.to(tl.int64) * stride_ct + c, mask=in_range, other=-1)
    usable = (idx >= 0) & (weight > float("-inf"))  # as _rescore_tokens: a -inf weight is never kept
    want = tl.minimum(tl.sum(usable.to(tl.int32)), budget)
    # weights as unsigned integers in float order (see pick_keys); tau: the largest with >= want at or above it
    bits = weight.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    tau = tl.zeros([], dtype=tl.uint32)
    for i in tl.static_range(32):
        trial = tau | tl.full([], 1 << (31 - i), tl.uint32)
        enough = tl.sum((usable & (key >= trial)).to(tl.int32)) >= want
        tau = tl.where(enough, trial, tau)
    above = usable & (key > tau)
    tied = (usable & (key == tau)).to(tl.int32)
    rest = want - tl.sum(above.to(tl.int32))
    keep = above | ((tied > 0) & (tl.cumsum(tied, 0) <= rest))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1  # candidates are ascending, so the kept ones stay ascending
    count = tl.sum(keep.to(tl.int32))

    out = KeyIdx + h.to(tl.int64) * stride_ih + tile.to(tl.int64) * stride_it
    fill = tl.arange(0, FILL)
    for s0 in range(0, num_slots, FILL):
        s = s0 + fill
        tl.store(out + s, tl.full([FILL], -1, tl.int64), mask=(s < num_slots) & (s >= count))
    tl.store(out + slot, idx, mask=keep)
    tl.store(Counts + h * stride_nh + tile, count)


def rescore_config(head_dim: int, element_size: int = 2, shared_memory: int | None = None,
                   rows_needed: int = 64) -> dict:
    """Query rows per slice, candidates per step, warps and pipeline depth of rescore_weights, per head dim: 64 rows
    x 64 keys up to head dim 128 (the sampled rows of a GQA group, G x R = 28 for 14 / 2 heads and R = 4, fit in one
    slice of 32), 32 x 32 at 256. shared_memory (bytes per block, default: the current GPU's, or the one forced by
    utils/kernels/shared_memory.py) shrinks the pipeline, then the keys per step, then the rows, until the query
    rows plus num_stages key blocks of element_size bytes fit (an RTX 3090 at head dim 256 in fp32: 2 stages).
    rows_needed (G x R) <= 16, one selection per query head: 2 warps and 4 stages (H200, bf16, R = 4, 1536
    candidates: 0.92 vs 1.14 ms at 32K, 3.5 vs 4.4 ms at 128K for 14 heads of dim 64; 0.93 vs 1.10 ms for 12 of 128;
    notes/cpu_testbed/gpu_rescore/ab_round12.py)."""
    if head_dim <= 128 and rows_needed <= 16:
        cfg = dict(rows=16, block_w=64, num_warps=2, num_stages=4)
    elif head_dim <= 128:
        cfg = dict(rows=64, block_w=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(rows=32, block_w=32, num_warps=4, num_stages=3)
    need = lambda c: element_size * head_dim * (c["rows"] + c["num_stages"] * c["block_w"])  # noqa: E731
    return shrink_to_fit(cfg, need, shared_memory, [("num_stages", 2), ("block_w", 16), ("rows", 16)])


def rescore_candidates(q: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor, *, budget: int, query_chunk: int,
                       q_offset: int, sink_tokens: int, local_tokens: int, rescore_queries: int = 0,
                       config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `budget` best of each tile's candidate keys, key by key, for one sequence.

    q: [Hq, Lq, D] fp16/bf16/fp32; keys: [H, Lk, D] (H heads select; G = Hq / H query heads share a selection);
    cand: [H, n_tiles, W] int64 ascending candidate keys per tile, -1 after (pick_keys at budget W).
    rescore_queries: R queries per tile rescore (0 or >= query_chunk: all). Returns key_index [H, n_tiles,
    min(budget, W)] int64 (ascending, -1 after) and counts [H, n_tiles] int32. config: rows, block_w, num_warps,
    num_stages. Memory: the W candidates (int64, from pick_keys) and their weights (fp32) of every (head, tile): at 128K
    keys, 6.25% and 14 selecting heads, 3.8 + 1.9 GB.
    """
    Hq, Lq, D = q.shape
    H, Lk, Dk = keys.shape
    T = query_chunk
    n_tiles, W = cand.shape[1], cand.shape[2]
    if D not in HEAD_DIMS or Dk != D or Hq % H or cand.shape[0] != H or n_tiles != math.ceil(Lq / T):
        raise ValueError(f"rescore_candidates needs head dim 16..256 (a power of two), Hq % H == 0 and one "
                         f"candidate list per (head, tile); got q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
                         f"cand {tuple(cand.shape)}")
    if W > MAX_CANDIDATES:
        raise ValueError(f"{W} candidates exceed the fused rescoring's limit of {MAX_CANDIDATES}")
    G = Hq // H
    R = rescore_queries if 0 < rescore_queries < T else T
    cfg = dict(rescore_config(D, 4 if q.dtype == torch.float32 else 2, rows_needed=G * R), **(config or {}))
    rows = max(16, min(cfg["rows"], triton.next_power_of_2(G * R)))
    if q.stride(-1) != 1:
        q = q.contiguous()
    keys = keys.to(q.dtype)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    cand = cand.contiguous()
    weight = torch.empty(H, n_tiles, W, dtype=torch.float32, device=q.device)
    # pass 1 writes its logits (fp32) for pass 2 when they are fewer bytes than a key, the keys are wide and the
    # buffer stays small; otherwise pass 2 gathers the keys again. H200, bf16, one selection per query head, R = 4,
    # 1536 candidates, rescore_config's 2-warp tiles (notes/cpu_testbed/gpu_rescore/ab_round12.py): head dim 128
    # 0.93 vs 1.10 ms at 32K, but head dim 64 0.95 vs 0.92 ms (gathering 128-byte keys again is as cheap)
    lanes = min(rows, G * R)  # rows of one slice that are real
    keep = D >= KEEP_LOGITS_HEAD_DIM and lanes * 4 <= D * q.element_size() \
        and H * n_tiles * lanes * W * 4 <= LOGITS_BYTES
    logits = torch.empty(H, n_tiles, lanes, W, dtype=torch.float32, device=q.device) if keep else weight
    _rescore_weights_kernel[(n_tiles, H)](
        q, keys, cand, weight, logits, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), cand.stride(0),
        cand.stride(1), weight.stride(0), weight.stride(1), logits.stride(0), logits.stride(1), Lq, q_offset, budget,
        sink_tokens, local_tokens, W, G, T, R, max(1, T // R), D ** -0.5,
        ROWS=rows, HEAD_DIM=D, BLOCK_W=cfg["block_w"], IEEE=q.dtype == torch.float32, KEEP=keep,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    K = min(budget, W)
    key_index = torch.empty(H, n_tiles, K, dtype=torch.long, device=q.device)
    counts = torch.empty(H, n_tiles, dtype=torch.int32, device=q.device)
    w_p2 = max(16, triton.next_power_of_2(W))
    _keep_best_kernel[(n_tiles, H)](
        weight, cand, key_index, counts, weight.stride(0), weight.stride(1), cand.stride(0), cand.stride(1),
        key_index.stride(0), key_index.stride(1), counts.stride(0), W, budget, K,
        W_P2=w_p2, FILL=1024, num_warps=4 if w_p2 <= 2048 else 8 if w_p2 <= 8192 else 32)  # 32: 1.7 vs 2.3 ms (16) at W = 16K, H200
    return key_index, counts


__all__ = ["forced_counts", "rescore_candidates", "rescore_config", "MAX_CANDIDATES"]
