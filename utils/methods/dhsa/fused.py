"""DHSA key selection on the GPU: chunk scores by one matrix product, the top-N_b keys per query tile by one Triton
program per (tile, head) instead of a top-k over L upsampled token scores.

Why it is the same selection. After upsampling, every key of a chunk carries its chunk's score, so the token
top-N_b of Algorithm 1 keeps whole chunks in descending score order until the budget is filled, and part of the
next chunk (which of its keys is a tie-break). Keys outside the tile's causal range are never candidates, and
the always-kept sink/local keys (utils.methods.dhsa.scores.forced_key_counts) are taken first; the candidates left in a chunk
then form one interval, [max(chunk start, sink), min(chunk end, tile end - local)). So per tile:

    R = tile budget - sink - local
    tau = the largest score with sum(candidate lengths of chunks scoring >= tau) >= R   (bisection on the bits)
    keep all candidates of chunks scoring > tau; chunks scoring == tau share the rest in position order
    write, ascending: sink keys, the kept interval of each chunk in chunk order, local keys; -1 after.

Equal to `utils.methods.dhsa.select.dhsa_select` up to tie-breaking inside the one partly kept chunk (tests/test_kernels.py).
The same program serves the block-aligned variant (App. D 2)): blocks of 128 keys play the part of keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from utils.config import DHSAOptions
from utils.kernels.head_dims import HEAD_DIMS
from utils.kernels.shared_memory import shrink_to_fit
from utils.methods.dhsa.fused_rescore import forced_counts, rescore_candidates
from utils.methods.dhsa.scores import (chunk_vectors, forced_key_counts, max_pooled_chunk_scores, query_tile_vectors,
                                       rescored_slots, tile_key_means)
from utils.selection import KernelSelection

MAX_CHUNKS = 32768  # chunk scores of one tile live in registers; longer lists use the reference path


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _take(key, length, wanted):
    """Keys taken from each chunk by the top-`wanted` over chunk scores: tau, the largest threshold with
    (candidate keys of chunks scoring >= tau) >= wanted, built bit by bit from the top (32 steps of 32-bit compares
    and one sum each); chunks above tau give all their keys, those at tau share the rest in position order."""
    tau = tl.zeros([], dtype=tl.uint32)
    for i in tl.static_range(32):
        trial = tau | tl.full([], 1 << (31 - i), tl.uint32)
        enough = tl.sum(tl.where(key >= trial, length, 0)) >= wanted
        tau = tl.where(enough, trial, tau)
    return _taken_at(tau, key, length, wanted)


@triton.jit
def _taken_at(tau, key, length, wanted):
    """_take's last step: the keys each chunk gives at threshold tau."""
    full = key > tau
    rest = wanted - tl.sum(tl.where(full, length, 0))
    tied = tl.where(key == tau, length, 0)
    take = tl.minimum(tl.maximum(rest - (tl.cumsum(tied, 0) - tied), 0), tied)
    keep = tl.where(full, length, take)
    return tl.where(wanted > 0, keep, 0)


@triton.jit
def _take_two(key, length, wanted, wider):
    """_take for two budgets at once (wanted <= wider): one bisection loop, two counts per step."""
    tau = tl.zeros([], dtype=tl.uint32)
    tau_w = tl.zeros([], dtype=tl.uint32)
    for i in tl.static_range(32):
        bit = tl.full([], 1 << (31 - i), tl.uint32)
        trial, trial_w = tau | bit, tau_w | bit
        n, n_w = tl.sum(tl.where(key >= trial, length, 0)), tl.sum(tl.where(key >= trial_w, length, 0))
        tau = tl.where(n >= wanted, trial, tau)
        tau_w = tl.where(n_w >= wider, trial_w, tau_w)
    return _taken_at(tau, key, length, wanted), _taken_at(tau_w, key, length, wider)


@triton.jit
def _write_intervals(out, first, keep, num_slots, count, head, tail_start, tail_len, FILL: tl.constexpr):
    """Write the ascending list [0, head) + the interval [first[c], first[c] + keep[c]) of each chunk c + [tail_start,
    tail_start + tail_len) into out[0 .. count), -1 up to num_slots. Slot s holds s + delta(s), with delta a step
    function (0 over the head slots, first - offset over each interval, tail_start - offset over the tail) that
    never decreases: every slot gets -1, each interval's delta is written at its first slot, and a running max over
    the slots, from 0, fills in the rest. All passes but the marker one are contiguous stores."""
    fill = tl.arange(0, FILL)
    offset = head + tl.cumsum(keep, 0) - keep
    used = tl.sum(keep)
    for s0 in range(0, num_slots, FILL):
        slot = s0 + fill
        tl.store(out + slot, tl.full([FILL], -1, tl.int64), mask=slot < num_slots)
    tl.debug_barrier()
    tl.store(out + offset, (first - offset).to(tl.int64), mask=keep > 0)
    if tail_len > 0:
        tl.store(out + head + used, (tail_start - head - used).to(tl.int64))
    tl.debug_barrier()
    carry = tl.zeros([], tl.int64)
    for s0 in range(0, count, FILL):
        slot = s0 + fill
        delta = tl.maximum(tl.associative_scan(tl.load(out + slot, mask=slot < count, other=-1), 0, _max2), carry)
        carry = tl.max(delta)
        tl.store(out + slot, slot + delta, mask=slot < count)


@triton.jit
def _dhsa_pick_kernel(
    Scores, Ends, KeyIdx, Counts, BandIdx, BandCounts,
    stride_sh, stride_st, stride_ih, stride_it, stride_ch, stride_bh, stride_bt,
    num_chunks, Lq, q_offset, budget, forced_budget, band_budget, sink_tokens, local_tokens, num_slots, band_slots,
    T: tl.constexpr, NC_P2: tl.constexpr, FILL: tl.constexpr, BAND: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    end = q_offset + tl.minimum((tile + 1) * T, Lq)  # keys visible to the tile's last query
    tile_budget = tl.minimum(end, budget)
    # forced_key_counts (utils/methods/dhsa/scores.py), per tile, of the budget the sinks and window belong to
    local, sink = forced_counts(tl.minimum(end, forced_budget), sink_tokens, local_tokens)
    free_hi = end - local
    wanted = tile_budget - sink - local

    c = tl.arange(0, NC_P2)
    in_range = c < num_chunks
    c_end = tl.load(Ends + c, mask=in_range, other=0).to(tl.int32)
    c_start = tl.load(Ends + c - 1, mask=in_range & (c > 0), other=0).to(tl.int32)
    lo = tl.maximum(c_start, sink)
    length = tl.where(in_range, tl.maximum(tl.minimum(c_end, free_hi) - lo, 0), 0)
    score = tl.load(Scores + head * stride_sh + tile * stride_st + c, mask=in_range, other=0.0)
    # scores as unsigned integers in the same order as the floats: flip all bits of negatives, the sign bit of the rest
    bits = score.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    if BAND:  # the kept keys and the wider pick's in one bisection (a few % faster than two, H200)
        keep, wider = _take_two(key, length, wanted, tl.minimum(end, band_budget) - sink - local)
    else:
        keep = _take(key, length, wanted)
    count = sink + tl.sum(keep) + local
    _write_intervals(KeyIdx + head * stride_ih + tile * stride_it, lo, keep, num_slots, count, sink, free_hi, local,
                     FILL)
    tl.store(Counts + head * stride_ch + tile, count)
    if BAND:  # the keys the top-band_budget adds to the top-budget: per chunk the interval after its kept keys
        extra = tl.maximum(wider - keep, 0)  # a prefix of the chunk's interval either way, so the band follows it
        band_count = tl.sum(extra)
        _write_intervals(BandIdx + head * stride_bh + tile * stride_bt, lo + keep, extra, band_slots, band_count, 0,
                         0, 0, FILL)
        tl.store(BandCounts + head * stride_ch + tile, band_count)


def pick_keys(scores: torch.Tensor, ends: torch.Tensor, *, num_queries: int, q_offset: int, budget: int,
              query_chunk: int, sink_tokens: int, local_tokens: int, num_slots: int, num_warps: int | None = None,
              forced_budget: int | None = None, band_budget: int | None = None):
    """Top-`budget` keys per query tile from chunk scores, for one sequence.

    scores: [H, n_tiles, Nc] fp32 (S_c); ends: [Nc] ascending chunk ends (last = number of keys).
    Returns key_index [H, n_tiles, num_slots] int64 (ascending, -1 after the kept keys) and counts [H, n_tiles]
    int32. Units are tokens, or blocks when the caller passes block scores and block ends. forced_budget (default
    `budget`): the budget whose sink and local counts are kept first; token rescoring picks `budget` = W candidates
    around the sinks and window of the final budget N_b, as the PyTorch path does. band_budget (> budget): also
    returns the keys that the top-band_budget adds to these (the margin candidates of rescore_window), as a third
    and fourth value: band [H, n_tiles, band_budget - budget] ascending, -1 after, and its counts.
    """
    H, n_tiles, Nc = scores.shape
    if Nc > MAX_CHUNKS:
        raise ValueError(f"{Nc} chunks exceed the fused selection's limit of {MAX_CHUNKS}")
    scores = scores.float().contiguous()
    ends = ends.to(torch.int32).contiguous()  # the kernel reads chunk ends as int32: half the bytes
    key_index = torch.empty(H, n_tiles, num_slots, dtype=torch.long, device=scores.device)
    counts = torch.empty(H, n_tiles, dtype=torch.int32, device=scores.device)
    band = band_budget is not None
    band_slots = max(1, band_budget - budget) if band else 1
    band_index = torch.empty(H, n_tiles, band_slots, dtype=torch.long, device=scores.device) if band else key_index
    band_counts = torch.empty(H, n_tiles, dtype=torch.int32, device=scores.device) if band else counts
    nc_p2 = max(16, triton.next_power_of_2(Nc))
    warps = num_warps or (4 if nc_p2 <= 2048 else 8 if nc_p2 <= 8192 else 16)
    _dhsa_pick_kernel[(n_tiles, H)](
        scores, ends, key_index, counts, band_index, band_counts,
        scores.stride(0), scores.stride(1), key_index.stride(0), key_index.stride(1), counts.stride(0),
        band_index.stride(0), band_index.stride(1),
        Nc, num_queries, q_offset, budget, budget if forced_budget is None else forced_budget,
        band_budget if band else budget, sink_tokens, local_tokens, num_slots, band_slots,
        T=query_chunk, NC_P2=nc_p2, FILL=1024, BAND=band, num_warps=warps,
    )
    if band:
        return key_index, counts, band_index, band_counts
    return key_index, counts


@triton.jit
def _chunk_sum_kernel(K, Ends, Out, stride_kh, stride_kl, stride_oh, stride_oc,
                      ROBUST: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """Chunk vector of eq. 4 for one (chunk, head): sum of its keys in fp32 times 1/sqrt(len) (or 1/len)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(Ends + c - 1, mask=c > 0, other=0).to(tl.int32)
    end = tl.load(Ends + c).to(tl.int32)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        x = tl.load(K + h * stride_kh + rows[:, None] * stride_kl + dims[None, :], mask=(rows < end)[:, None],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    n = (end - start).to(tl.float32)
    weight = 1.0 / tl.sqrt(n) if ROBUST else 1.0 / n
    tl.store(Out + h * stride_oh + c * stride_oc + dims, acc * weight)


@triton.jit
def _tile_sum_kernel(Q, Out, stride_qh, stride_ql, stride_oh, stride_ot, Lq, G, T,
                     ROBUST: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """Query-tile vector for one (tile, KV head): mean over the tile's queries and the GQA group, times
    sqrt(tile length) if robust (as utils.methods.dhsa.scores.query_tile_vectors)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    q0 = t * T
    q1 = tl.minimum(q0 + T, Lq)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for g in range(0, G):
        for r0 in range(q0, q1, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            x = tl.load(Q + (h * G + g) * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                        mask=(rows < q1)[:, None], other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
    n = (q1 - q0).to(tl.float32)
    vec = acc / (G * n)
    if ROBUST:
        vec = vec * tl.sqrt(n)
    tl.store(Out + h * stride_oh + t * stride_ot + dims, vec)


def chunk_vectors_gpu(keys: torch.Tensor, ends: torch.Tensor, robust: bool = True, rows: int | None = None
                      ) -> torch.Tensor:
    """utils.methods.dhsa.scores.chunk_vectors by direct sums: keys [H, L, D], ends [Nc] -> [H, Nc, D] fp32. rows: keys summed
    per step (default: the mean chunk length rounded up to a power of two, 16..64)."""
    H, L, D = keys.shape
    if rows is None:
        rows = min(64, max(16, triton.next_power_of_2(math.ceil(L / max(1, ends.numel())))))
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    out = torch.empty(H, ends.numel(), D, dtype=torch.float32, device=keys.device)
    _chunk_sum_kernel[(ends.numel(), H)](keys, ends.contiguous(), out, keys.stride(0), keys.stride(1), out.stride(0),
                                        out.stride(1), ROBUST=robust, HEAD_DIM=D, ROWS=rows)
    return out


def tile_vectors_gpu(q: torch.Tensor, num_kv_heads: int, query_chunk: int, robust: bool = True,
                     rows: int | None = None) -> torch.Tensor:
    """utils.methods.dhsa.scores.query_tile_vectors for one sequence: q [Hq, L, D] -> [Hkv, n_tiles, D] fp32. rows: queries
    summed per step (default: the tile length, 16..128)."""
    Hq, L, D = q.shape
    rows = rows or min(128, max(16, triton.next_power_of_2(query_chunk)))
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_tiles = math.ceil(L / query_chunk)
    out = torch.empty(num_kv_heads, n_tiles, D, dtype=torch.float32, device=q.device)
    _tile_sum_kernel[(n_tiles, num_kv_heads)](q, out, q.stride(0), q.stride(1), out.stride(0), out.stride(1), L,
                                              Hq // num_kv_heads, query_chunk, ROBUST=robust, HEAD_DIM=D, ROWS=rows)
    return out


@triton.jit
def _max_pooled_scores_kernel(Q, C, Out, Visible, KeyMean, Weight, stride_qh, stride_ql, stride_ch, stride_cc,
                              stride_oh, stride_ot, stride_mh, stride_mt, Lq, Nc, G, T, n_tiles,
                              TILES: tl.constexpr, TILE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_C: tl.constexpr, IEEE: tl.constexpr, CENTER: tl.constexpr):
    """S_c with max pooling for TILES query tiles of one KV head, all chunks (as max_pooled_chunk_scores).

    The program's rows are TILES tiles x TILE_ROWS queries. A tile longer than TILE_ROWS (then TILES = 1) is
    done in slices of TILE_ROWS queries; later slices take the max with what the earlier ones wrote. Chunks at
    or past Visible[last tile of the program] start after every query of the program and are skipped (causal:
    half the work); their scores stay as the caller initialised them. CENTER: scores drop
    Weight[c] * (q . KeyMean[tile]) (utils.methods.dhsa.scores.tile_key_means), per query before the max."""
    t0 = tl.program_id(0) * TILES
    visible = tl.load(Visible + tl.minimum(t0 + TILES, n_tiles) - 1)
    h = tl.program_id(1)
    r = tl.arange(0, TILES * TILE_ROWS)
    tile = t0 + r // TILE_ROWS
    dims = tl.arange(0, HEAD_DIM)
    tiles = t0 + tl.arange(0, TILES)
    out_rows = Out + h.to(tl.int64) * stride_oh + tiles.to(tl.int64)[None, :] * stride_ot
    for s in range(0, T, TILE_ROWS):
        within = s + r % TILE_ROWS
        pos = tile * T + within
        valid = (within < T) & (pos < Lq)
        # GQA group sum in fp32 (as the reference), rounded once to the dot's input type
        q = tl.zeros([TILES * TILE_ROWS, HEAD_DIM], dtype=tl.float32)
        for g in range(0, G):
            q_head = Q + (h * G + g).to(tl.int64) * stride_qh
            q += tl.load(q_head + pos[:, None] * stride_ql + dims[None, :], mask=valid[:, None], other=0.0)
        if CENTER:  # q . m_t per row, in fp32
            mean = tl.load(KeyMean + h * stride_mh + tl.minimum(tile, n_tiles - 1)[:, None] * stride_mt
                           + dims[None, :])
            shift = tl.sum(q * mean, 1)
        q = q.to(C.dtype.element_ty)
        for c0 in range(0, visible, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ck = tl.load(C + h * stride_ch + cols[:, None] * stride_cc + dims[None, :], mask=(cols < Nc)[:, None],
                         other=0.0)
            # chunks x queries, so that the max over a tile's queries runs along the rows of the product
            # (within a thread and its quad) rather than across warps
            if IEEE:
                scores = tl.dot(ck, tl.trans(q), input_precision="ieee")
            else:
                scores = tl.dot(ck, tl.trans(q))  # bf16 inputs, fp32 accumulator
            if CENTER:
                weight = tl.load(Weight + cols, mask=cols < Nc, other=0.0)
                scores -= weight[:, None] * shift[None, :]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            best = tl.max(tl.reshape(scores, [BLOCK_C, TILES, TILE_ROWS]), 2)  # [BLOCK_C, TILES]
            ptrs = out_rows + cols[:, None]
            store_ok = (cols < Nc)[:, None] & (tiles < n_tiles)[None, :]
            if s > 0:  # a later slice of a long tile: keep the best over all slices
                best = tl.maximum(best, tl.load(ptrs, mask=store_ok, other=float("-inf")))
            tl.store(ptrs, best, mask=store_ok)


def max_pooled_config(head_dim: int, element_size: int = 2, shared_memory: int | None = None) -> dict:
    """Tile shape of the max-pooled scoring kernel per head dim: query rows per program, chunks per step, warps,
    pipeline depth. The head-dim-128 choice was measured on an H100 at 128K tokens, T = 64: 2.8 ms (128 x 128 chunks,
    8 warps: 3.0 ms). shared_memory (bytes per block, default: the current GPU's, or the one forced by
    utils/kernels/shared_memory.py) shrinks the pipeline, then the chunks per step, then the rows, until the tiles
    fit: the queries (rows x D) plus num_stages chunk tiles (block_c x D), of element_size bytes (4 for fp32 q). An
    RTX 3090 (99 KB) gets, at head dim 256, 2 stages instead of 3; with fp32 queries also smaller tiles."""
    if head_dim <= 64:
        cfg = dict(rows=128, block_c=128, num_warps=4, num_stages=3)
    elif head_dim <= 128:
        cfg = dict(rows=128, block_c=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(rows=64, block_c=64, num_warps=8, num_stages=3)
    need = lambda c: element_size * head_dim * (c["rows"] + c["num_stages"] * c["block_c"])  # noqa: E731
    return shrink_to_fit(cfg, need, shared_memory, [("num_stages", 2), ("block_c", 32), ("rows", 32)])


def max_pooled_chunk_scores_gpu(q: torch.Tensor, chunk_k: torch.Tensor, query_chunk: int, *,
                                ends: torch.Tensor | None = None, q_offset: int = 0, centring=None,
                                config: dict | None = None) -> torch.Tensor:
    """utils.methods.dhsa.scores.max_pooled_chunk_scores by one Triton kernel: q [Hq, Lq, D], chunk_k [H, Nc, D] (H = Hkv, or 1
    for one selection shared by all heads) -> [H, n_tiles, Nc] fp32, the best dot product over each tile's
    queries (the queries of a GQA group summed first).

    ends (the chunk ends, [Nc]) and q_offset (position of the first query) make it causal: a chunk that starts
    at or after a tile's last visible key is never a candidate of that tile (pick_keys gives it no keys), so it
    is not scored and reads -inf. Without `ends` every chunk is scored. centring: (key_mean [H, n_tiles, D],
    weight [Nc]) from utils.methods.dhsa.scores.tile_key_means, applied per query as the reference does.

    16-bit q: the group sum is taken in fp32 and rounded once to bf16, chunk_k is rounded to bf16, and the dot
    products accumulate in fp32 on the tensor cores: scores carry bf16 input rounding (~0.4% of |q||k|), enough
    for the top-K ranking they feed. bf16 also for fp16 q: a sum of G heads may overflow fp16's range. fp32 q:
    exact fp32 products (tests compare key sets with the reference). config: overrides of rows (queries per
    program), block_c (chunks per step), num_warps, num_stages (the CPU interpreter tests use small tiles).
    """
    Hq, Lq, D = q.shape
    H, Nc, Dc = chunk_k.shape
    if D not in HEAD_DIMS or Dc != D or Hq % H:
        raise ValueError(f"max_pooled_chunk_scores_gpu needs head dim 16..256 (a power of two) and Hq % H == 0; "
                         f"got q {tuple(q.shape)}, chunk_k {tuple(chunk_k.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"max_pooled_chunk_scores_gpu takes fp16/bf16/fp32 queries, got {q.dtype}")
    T = query_chunk
    n_tiles = math.ceil(Lq / T)
    cfg = dict(max_pooled_config(D, 4 if q.dtype == torch.float32 else 2), **(config or {}))
    tile_rows = min(triton.next_power_of_2(T), cfg["rows"])
    tiles = max(1, cfg["rows"] // tile_rows)
    if q.stride(-1) != 1:
        q = q.contiguous()
    chunk_k = chunk_k.to(torch.float32 if q.dtype == torch.float32 else torch.bfloat16).contiguous()
    if ends is None:
        visible = torch.full((n_tiles,), Nc, dtype=torch.int32, device=q.device)
        out = torch.empty(H, n_tiles, Nc, dtype=torch.float32, device=q.device)
    else:  # chunks whose start (the previous end) lies before the tile's last visible key
        tile_end = q_offset + torch.clamp(torch.arange(1, n_tiles + 1, device=q.device) * T, max=Lq)
        visible = (torch.searchsorted(ends.to(tile_end.dtype), tile_end) + 1).clamp(max=Nc).to(torch.int32)
        out = torch.full((H, n_tiles, Nc), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if centring is not None:
        key_mean, weight = centring[0].float().contiguous(), centring[1].float().contiguous()
    else:
        key_mean, weight = out, out  # unused
    _max_pooled_scores_kernel[(math.ceil(n_tiles / tiles), H)](
        q, chunk_k, out, visible, key_mean, weight, q.stride(0), q.stride(1), chunk_k.stride(0), chunk_k.stride(1),
        out.stride(0), out.stride(1), key_mean.stride(0), key_mean.stride(1), Lq, Nc, Hq // H, T, n_tiles,
        TILES=tiles, TILE_ROWS=tile_rows, HEAD_DIM=D, BLOCK_C=cfg["block_c"], IEEE=q.dtype == torch.float32,
        CENTER=centring is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _max_pooled_scores(q: torch.Tensor, chunk_k: torch.Tensor, query_chunk: int, ends: torch.Tensor,
                       q_offset: int, centring) -> torch.Tensor:
    """S_c with max pooling for one sequence: the kernel where it applies (causal: chunks after a tile are not
    scored), else the PyTorch reference."""
    if q.shape[-1] in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return max_pooled_chunk_scores_gpu(q, chunk_k, query_chunk, ends=ends, q_offset=q_offset, centring=centring)
    return max_pooled_chunk_scores(q, chunk_k, query_chunk, centring=centring)


def _chunk_vectors(keys: torch.Tensor, ends: torch.Tensor, robust: bool) -> torch.Tensor:
    """Chunk vectors (eq. 4) of one sequence: keys [heads, L, D] -> [heads, Nc, D] fp32."""
    if keys.shape[-1] in HEAD_DIMS:
        return chunk_vectors_gpu(keys, ends, robust)
    return chunk_vectors(keys, ends, robust)


def _chunk_scores(q_vec_b: torch.Tensor, keys: torch.Tensor, ends: torch.Tensor, robust: bool) -> torch.Tensor:
    """S_c = Q_c K_c^T for one sequence. q_vec_b [heads, n_tiles, D], keys [heads, L, D] -> [heads, n_tiles, Nc]."""
    return torch.bmm(q_vec_b, _chunk_vectors(keys, ends, robust).transpose(1, 2))


def _tile_vectors(q: torch.Tensor, num_kv_heads: int, query_chunk: int, robust: bool) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, Hkv, n_tiles, D] fp32."""
    if q.shape[-1] in HEAD_DIMS:
        return torch.stack([tile_vectors_gpu(q[b], num_kv_heads, query_chunk, robust) for b in range(q.shape[0])])
    return query_tile_vectors(q, num_kv_heads, query_chunk, robust)


def dhsa_select_fused(q: torch.Tensor, k: torch.Tensor, *, budget: int, boundaries: list[torch.Tensor],
                      options: DHSAOptions) -> KernelSelection:
    """Same contract and result as utils.methods.dhsa.select.dhsa_select with head_pooling "mean" (up to ties), on the GPU: the
    queries of a GQA group are summed before scoring, whatever options.head_pooling says; token_rescore > 1 rescores
    the W = token_rescore x N_b best keys of each tile key by key (utils/methods/dhsa/fused_rescore.py). q: [B, Hq, Lq, D],
    k: [B, Hkv, Lk, D]; returns key_index [B, Hkv, n_tiles, min(budget, Lk)] plus counts."""
    T, robust, share_heads = options.query_chunk, options.robust_chunk_repr, options.share_heads
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n_tiles = math.ceil(Lq / T)
    K = min(budget, Lk)
    W = min(Lk, math.ceil(options.token_rescore * K)) if options.token_rescore else K  # candidates per tile
    margin = rescore_margin(options, K, Lq, Lk) if W > K else 0  # rescore_window: the slots rescoring decides
    band_width = min(Lk, K - margin + math.ceil(options.token_rescore * margin))
    if options.query_pooling == "mean":
        q_vec = _tile_vectors(q, Hkv, T, robust)
        if share_heads:
            q_vec = q_vec.mean(dim=1, keepdim=True)
    heads = 1 if share_heads else Hkv
    key_index = torch.empty(B, heads, n_tiles, K, dtype=torch.long, device=q.device)
    counts = torch.empty(B, heads, n_tiles, dtype=torch.int32, device=q.device)
    tile_end = (Lk - Lq) + torch.clamp(torch.arange(1, n_tiles + 1, device=q.device) * T, max=Lq)
    for b in range(B):
        keys = k[b].float().mean(0, keepdim=True) if share_heads else k[b]
        chunk_k = _chunk_vectors(keys, boundaries[b], robust)
        centring = tile_key_means(chunk_k, boundaries[b], tile_end, robust) if options.center_keys else None
        if options.query_pooling == "mean":
            scores = torch.bmm(q_vec[b], chunk_k.transpose(1, 2))
            if centring is not None:
                scores -= (q_vec[b] * centring[0]).sum(-1, keepdim=True) * centring[1]
        else:
            scores = _max_pooled_scores(q[b], chunk_k, T, boundaries[b], Lk - Lq, centring)
        forced = dict(sink_tokens=options.sink_tokens, local_tokens=options.local_tokens)
        if W > K and margin:  # the best K - C keys by chunk score, the last C slots rescored among the next ones
            keep, keep_counts, band, _ = pick_keys(scores, boundaries[b], num_queries=Lq, q_offset=Lk - Lq,
                                                   budget=K - margin, query_chunk=T, num_slots=K - margin,
                                                   forced_budget=budget, band_budget=band_width, **forced)
            chosen, chosen_counts = rescore_candidates(q[b], keys, band, budget=margin, query_chunk=T,
                                                       q_offset=Lk - Lq, rescore_queries=options.rescore_queries,
                                                       sink_tokens=0, local_tokens=0)
            key_index[b], counts[b] = merge_sorted(keep, keep_counts, chosen, chosen_counts), keep_counts + chosen_counts
        elif W > K:  # the W best keys by chunk scores, then the N_b best of those key by key
            cand, _ = pick_keys(scores, boundaries[b], num_queries=Lq, q_offset=Lk - Lq, budget=W, query_chunk=T,
                                num_slots=W, forced_budget=budget, **forced)
            key_index[b], counts[b] = rescore_candidates(q[b], keys, cand, budget=budget, query_chunk=T,
                                                         q_offset=Lk - Lq, rescore_queries=options.rescore_queries,
                                                         **forced)
        else:
            key_index[b], counts[b] = pick_keys(scores, boundaries[b], num_queries=Lq, q_offset=Lk - Lq,
                                                budget=budget, query_chunk=T, num_slots=K, **forced)
    if share_heads:
        key_index, counts = key_index.expand(B, Hkv, n_tiles, K), counts.expand(B, Hkv, n_tiles)
    return KernelSelection(key_index, T, Lk - Lq, counts=counts)


def rescore_margin(options: DHSAOptions, budget: int, num_queries: int, num_keys: int) -> int:
    """The slots that rescoring decides with rescore_window (0: all, the plain rescoring): at most the window, never
    a tile's sinks or local keys (as utils.methods.dhsa.select._select_on_pytorch)."""
    if not options.rescore_window:
        return 0
    T = options.query_chunk
    n_tiles = math.ceil(num_queries / T)
    tile_end = (num_keys - num_queries) + torch.clamp(torch.arange(1, n_tiles + 1) * T, max=num_queries)
    sink, local = forced_key_counts(torch.clamp(tile_end, max=budget), options.sink_tokens, options.local_tokens)
    return rescored_slots(options.rescore_window, budget, int((sink + local).max()))


@triton.jit
def _rank_in(row, count, x, valid, STEPS: tl.constexpr):
    """For each x (a vector), the number of entries of the ascending row[0 .. count) below x (binary search)."""
    lo = tl.zeros_like(x).to(tl.int32)
    hi = tl.zeros_like(lo) + count
    for _ in tl.static_range(STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(row + mid, mask=valid & open_, other=0)
        right = open_ & (v < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    return lo


@triton.jit
def _merge_kernel(A, CountA, B, CountB, Out, stride_ah, stride_at, stride_bh, stride_bt, stride_oh, stride_ot,
                  stride_ch, n_a, n_b, STEPS_A: tl.constexpr, STEPS_B: tl.constexpr, B_P2: tl.constexpr,
                  FILL: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    a = A + head.to(tl.int64) * stride_ah + tile.to(tl.int64) * stride_at
    b = B + head.to(tl.int64) * stride_bh + tile.to(tl.int64) * stride_bt
    out = Out + head.to(tl.int64) * stride_oh + tile.to(tl.int64) * stride_ot
    ca = tl.load(CountA + head * stride_ch + tile)
    cb = tl.load(CountB + head * stride_ch + tile)
    j = tl.arange(0, B_P2)  # every entry of b goes to its index plus the entries of a below it
    ok = j < cb
    x = tl.load(b + j, mask=ok, other=0)
    tl.store(out + j + _rank_in(a, ca, x, ok, STEPS_A), x, mask=ok)
    for i0 in range(0, n_a, FILL):  # and every entry of a to its index plus the entries of b below it
        i = i0 + tl.arange(0, FILL)
        listed = i < ca
        y = tl.load(a + i, mask=listed, other=0)
        tl.store(out + i + _rank_in(b, cb, y, listed, STEPS_B), y, mask=listed)
    for s0 in range(0, n_a + n_b, FILL):
        slot = s0 + tl.arange(0, FILL)
        tl.store(out + slot, tl.full([FILL], -1, tl.int64), mask=(slot >= ca + cb) & (slot < n_a + n_b))


def merge_sorted(a: torch.Tensor, count_a: torch.Tensor, b: torch.Tensor, count_b: torch.Tensor) -> torch.Tensor:
    """Two ascending key lists per (head, tile) merged into one: a [H, n, Na] and b [H, n, Nb] with count_a /
    count_b [H, n] entries each (-1 after; no key in both) -> [H, n, Na + Nb] ascending, -1 after. One program per
    row: each entry goes to its index plus the number of the other list's entries below it (binary search)."""
    H, n, Na = a.shape
    Nb = b.shape[-1]
    out = torch.empty(H, n, Na + Nb, dtype=torch.long, device=a.device)
    a, b = a.contiguous(), b.contiguous()
    count_a, count_b = count_a.to(torch.int32).contiguous(), count_b.to(torch.int32).contiguous()
    _merge_kernel[(n, H)](a, count_a, b, count_b, out, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                          out.stride(0), out.stride(1), count_a.stride(0), Na, Nb,
                          STEPS_A=max(1, Na.bit_length()), STEPS_B=max(1, Nb.bit_length()),
                          B_P2=max(16, triton.next_power_of_2(Nb)), FILL=1024, num_warps=4)
    return out


def snap_to_blocks(ends: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """Chunk ends moved to block boundaries (App. D 2)), in block units: [Nc'] ascending, last = ceil(L / block)."""
    blocks = torch.div(ends + block_size // 2, block_size, rounding_mode="floor").clamp(min=1)
    last = math.ceil(num_keys / block_size)
    blocks = torch.unique_consecutive(torch.clamp(blocks, max=last))
    if blocks[-1].item() != last:
        blocks = torch.cat([blocks, blocks.new_tensor([last])])
    return blocks


def dhsa_block_select(q: torch.Tensor, k: torch.Tensor, *, budget: int, boundaries: list[torch.Tensor],
                      block_size: int, options: DHSAOptions) -> KernelSelection:
    """Block-aligned DHSA (App. D 2)): chunk boundaries snapped to `block_size`, chunk scores upsampled to
    blocks, top-K blocks per query block with K = max(1, N_b // block_size); the first and the diagonal blocks
    are always kept (sink/local, rounded up to blocks). Query tiles are one block long, scored by their mean
    query: of the options, robust_chunk_repr, sink_tokens, local_tokens and share_heads apply.

    Returns a KernelSelection in block mode: key_index [B, Hkv, n_qblocks, K] lists block numbers."""
    robust, share_heads = options.robust_chunk_repr, options.share_heads
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if (Lk - Lq) % block_size:
        raise ValueError(f"block-aligned selection needs the query offset ({Lk - Lq}) to be a multiple of "
                         f"the block size ({block_size})")
    n_kblocks = math.ceil(Lk / block_size)
    n_tiles = math.ceil(Lq / block_size)
    K = max(1, min(budget // block_size, n_kblocks))
    q_vec = _tile_vectors(q, Hkv, block_size, robust)
    if share_heads:
        q_vec = q_vec.mean(dim=1, keepdim=True)
    heads = 1 if share_heads else Hkv
    key_index = torch.empty(B, heads, n_tiles, K, dtype=torch.long, device=q.device)
    counts = torch.empty(B, heads, n_tiles, dtype=torch.int32, device=q.device)
    for b in range(B):
        block_ends = snap_to_blocks(boundaries[b], Lk, block_size)
        token_ends = torch.clamp(block_ends * block_size, max=Lk)
        keys = k[b].float().mean(0, keepdim=True) if share_heads else k[b]
        scores = _chunk_scores(q_vec[b], keys, token_ends, robust)
        key_index[b], counts[b] = pick_keys(
            scores, block_ends, num_queries=n_tiles, q_offset=(Lk - Lq) // block_size, budget=K, query_chunk=1,
            sink_tokens=math.ceil(options.sink_tokens / block_size),
            local_tokens=math.ceil(options.local_tokens / block_size),
            num_slots=K)
    if share_heads:
        key_index, counts = key_index.expand(B, Hkv, n_tiles, K), counts.expand(B, Hkv, n_tiles)
    return KernelSelection(key_index, block_size, Lk - Lq, counts=counts, block_size=block_size)


__all__ = ["chunk_vectors_gpu", "tile_vectors_gpu", "max_pooled_chunk_scores_gpu", "max_pooled_config", "pick_keys",
           "dhsa_select_fused", "dhsa_block_select", "snap_to_blocks", "MAX_CHUNKS"]
