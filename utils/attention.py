"""Attention executors shared by every method: exact dense attention, and sparse attention over a `Selection`.

A sparse method only decides *which keys each query may read* (a `Selection`, utils/selection.py); this module
runs the attention on those keys. Each query reads at most `key_index.shape[-1]` keys, always causally.

Where it runs: `sparse_attention` is the one place that chooses between the Triton kernel (utils/kernels, CUDA
tensors, when `kernels.try_sparse_attention` accepts the inputs) and the PyTorch path written out here. The
kernel computes the same attention (tests/test_kernels.py), so results never depend on whether Triton is there.

Shapes: q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] with Hq a multiple of Hkv (grouped-query attention, GQA).
Queries sit at absolute positions `q_offset + arange(Lq)` (q_offset = Lk - Lq when a KV cache holds the past).
K and V are never repeated per query head: heads of a GQA group are stacked along the query axis instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import kernels
from utils.selection import Selection, block_selection_to_tokens

# Upper bound on the elements of the temporaries of one tile group (mask + gathered K/V); bounds peak memory.
_GROUP_ELEMENTS = 1 << 25
_CPU_GROUP_ELEMENTS = 1 << 25  # CPU, masked executor: large groups; on a busy 2-core box every extra op waits
_CPU_GATHER_ELEMENTS = 1 << 21  # CPU, flash executor (_sparse_attention_cpu): gathered K + V of one call (8 MB fp32)
                                # stay in cache and below glibc's mmap threshold (larger ones page-fault every call)

# SDPA's CPU flash kernel with its log-sum-exp (a private ATen op since torch 2.2); None where it is missing.
_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split_heads(q: torch.Tensor, k: torch.Tensor, heads: int) -> tuple[int, int]:
    """Return (Hs, queries stacked per selection head) and check the GQA layout."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if heads not in (Hq, Hkv):
        raise ValueError(f"selection has {heads} heads; expected {Hkv} (per KV head) or {Hq} (per query head)")
    return heads, Hq // heads


def _attend(q, k, v, mask, scale, softcap, has_key=None):
    """Masked attention. q: [N, M, D], k: [N, K, D], v: [N, K, Dv], mask: [N, M, K] bool (True = read).

    has_key: [N, M] bool, whether a row reads any key (computed from the mask when not given). A row that
    reads nothing (possible only for hand-made selections) gets 0, as in FlashAttention.
    """
    if softcap is None:
        # 4-D inputs with an additive float mask reach the fused SDPA kernels on CPU and GPU; a 3-D or boolean
        # mask falls back to the much slower unfused math path on the CPU.
        zero, minus_inf = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
        bias = torch.where(mask, zero, minus_inf)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=bias[:, None],
                                             scale=scale)[:, 0]
    else:  # logit soft-capping (Gemma-2) is not supported by SDPA: do the math, softmax in fp32
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    has_key = mask.any(-1) if has_key is None else has_key
    if not bool(has_key.all()):
        out = torch.where(has_key[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _attend_split(q, k, v, k_pos, q_pos, scale):
    """CPU attention over gathered keys without a full mask, or None when it does not apply (then _attend).

    q: [N, M, D], k: [N, K, D], v: [N, K, Dv]; k_pos: [N, K] key positions (unused slots after every query);
    q_pos: [N, M]. The mask of a tile is causal, so it only bites on the keys at or after the tile's first query:
    with sorted key lists (DHSA, every method built on `Selection` top-k) those are the last slots. Slots before
    the first such slot (in every row of the group) are visible to every query: attention on them runs with no
    mask at all, attention on the short suffix with a small additive mask, and the two merge by their log-sum-exp
    (exact: softmax over the union). Building the [N, M, K] mask cost more than the attention itself on the CPU.
    """
    needs_mask = (k_pos > q_pos.amin(-1, keepdim=True)).any(0)  # [K]: a column that hides a key from some query
    j = int(needs_mask.to(torch.int8).argmax()) if bool(needs_mask.any()) else k.shape[1]
    if j == 0:
        return None  # every column needs the mask: nothing to split off
    out_a, lse_a = _flash_with_lse(q[:, None], k[:, None, :j], v[:, None, :j], scale=scale)
    if j == k.shape[1]:
        return out_a[:, 0]
    tail = k_pos[:, None, j:] <= q_pos[:, :, None]  # [N, M, K - j]
    zero, minus_inf = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
    out_b, lse_b = _flash_with_lse(q[:, None], k[:, None, j:], v[:, None, j:],
                                   attn_mask=torch.where(tail, zero, minus_inf)[:, None], scale=scale)
    # A row that sees no key of the suffix gets output 0 and lse 0 from the kernel: give it weight 0.
    lse_b = torch.where(tail.any(-1)[:, None], lse_b, float("-inf"))
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return (out_a.float() * w_a + out_b.float() * w_b).to(q.dtype)[:, 0]


def _products_for(q: torch.Tensor, rows: int) -> bool:
    """Whether _attend_tiles computes tiles of `rows` query rows by products and a softmax (fp32, at most 128 rows:
    there the CPU flash kernel splits a tile into 32-row blocks and ran 9-18% slower; README, Latency, CPU)."""
    return q.dtype == torch.float32 and rows <= 128


def _attend_tiles(q, k, v, bias, scale: float, scores: torch.Tensor | None, masked_from: int = 0) -> torch.Tensor:
    """Attention of tiles that share one key pattern: q [N, M, D] on k, v [N, K, D] with the additive mask bias
    [1, 1, M, K] (None: every query sees every key; every row sees at least one key either way). scores: a buffer
    of >= N * M * K elements for the logits where _products_for(q, M), else None (then SDPA's CPU flash kernel).
    masked_from: the bias is 0 on the columns before it (keys before the tile: every row sees them), so the products
    add it only from there on. Returns [N, M, D]."""
    if scores is None:
        return _flash_with_lse(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=scale)[0][:, 0]
    N, M, K = q.shape[0], q.shape[1], k.shape[1]
    logits = scores[: N * M * K].view(N, M, K)
    # the scale on the [N, M, D] queries rather than the [N, M, K] logits (a pass over M x D, not M x K), and the
    # mask added on its masked columns only (the tile's own keys): baddbmm with the whole bias read it N times
    torch.bmm(q * scale, k.transpose(1, 2), out=logits)
    if bias is not None and masked_from < K:
        logits[:, :, masked_from:] += bias[0, :, :, masked_from:]
    return torch.bmm(torch.softmax(logits, dim=-1, out=logits), v)


def _attend_before(q, k, v, idx, scale: float) -> torch.Tensor:
    """Attention of q [B, Hq, Lq, D] on the keys idx [B, Hs, K] (every slot used, every key before every query), read
    from k, v [B, Hkv, Lk, D]: one gather of K and one of V, one unmasked flash call. Returns [B, Hq, Lq, D]."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    Hs, K = idx.shape[1], idx.shape[2]
    kv_head = torch.arange(Hs, device=q.device) // (Hs // Hkv)  # selection head -> kv head
    rows = (idx + ((torch.arange(B, device=q.device)[:, None] * Hkv + kv_head[None, :]) * Lk)[:, :, None]).reshape(-1)
    kk = torch.index_select(k.reshape(B * Hkv * Lk, D), 0, rows).view(B * Hs, 1, K, D)
    vv = torch.index_select(v.reshape(B * Hkv * Lk, D), 0, rows).view(B * Hs, 1, K, D)
    qq = q.reshape(B * Hs, 1, (Hq // Hs) * Lq, D)  # the query heads that share a key list, stacked
    return _flash_with_lse(qq, kk, vv, scale=scale)[0].view(B, Hq, Lq, D)


def _sparse_attention_cpu(q, k, v, idx, q_offset: int, T: int, scale: float,
                         total_rows: int | None = None) -> torch.Tensor:
    """sparse_attention on the CPU for sorted key lists (_attend_tiles: products and a softmax for short fp32 tiles,
    else SDPA's CPU flash kernel). q: [B, Hq, Lq, D];
    k, v: [B, Hkv, Lk, D]; idx: [B, Hs, n_tiles, K] (ascending per tile, -1 pads after every query). Returns
    [B, Hq, Lq, D], or [B, Hq, total_rows, D] with the rows after Lq left for the caller to fill.

    Which rows of a tile see which slot depends only on clamp(k_pos - q_start, -1, T): -1 (before the tile: every
    row), 0 .. T-1 (inside it: causal), T (after it, or unused: no row). Where every head of a tile has the same
    pattern (DHSA's lists: sinks and chunks before the tile, then the tile's own keys), one [G*T, K] additive mask
    broadcast over the heads makes the tile one call; consecutive tiles with one pattern share a call. K and
    V are gathered into one buffer reused by every call (together, [K | V] rows, in a prefill): a fresh
    allocation of this size is a fresh mmap, and its page faults cost more than the copy. Tiles whose heads
    differ run, a few at a time, on _attend_split (or fully masked). The tiles' key patterns are computed first, a
    cache-sized slab of tiles at a time; the loop then makes each run's gather indices, gathers and attends.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    _, Hs, n_tiles, K = idx.shape
    G = Hq // Hs
    if n_tiles == 1 and total_rows is None and bool((idx >= 0).all()) and int(idx.amax()) <= q_offset:
        # one tile whose slots are all used and all precede its first query (a decode step): no mask, no patterns
        return _attend_before(q, k, v, idx[:, :, 0], scale)
    pad = n_tiles * T - Lq
    qt = F.pad(q, (0, 0, 0, pad)) if pad else q
    # tiles as [n_tiles, B, Hs, G, T, D], a view: each run copies its own tiles (in cache), and the output is
    # written in its final layout, so neither the queries nor the output make a pass over [n_tiles, ...] copies
    qt = qt.view(B, Hs, G, n_tiles, T, D).permute(3, 0, 1, 2, 4, 5)
    n_rows = n_tiles * T if total_rows is None else max(math.ceil(total_rows / T), n_tiles) * T
    out_full = torch.empty(B, Hs, G, n_rows // T, T, D, dtype=q.dtype, device=q.device)
    out = out_full.permute(3, 0, 1, 2, 4, 5)
    # K and V gathered by one index_select of [K | V] rows where the tiles read more rows than the cache holds
    # (a prefill; the concatenation is then a small extra pass); a decode step gathers them apart (no copy of the cache)
    together = n_tiles * Hs * K >= 2 * Hkv * Lk
    kv = torch.cat([k, v], dim=-1).reshape(B * Hkv * Lk, 2 * D) if together else None
    k_flat, v_flat = k.reshape(B * Hkv * Lk, D), v.reshape(B * Hkv * Lk, D)
    kv_head = torch.arange(Hs, device=q.device) // (Hs // Hkv)  # selection head -> kv head
    base = ((torch.arange(B, device=q.device)[:, None] * Hkv + kv_head[None, :]) * Lk)[None, :, :, None]
    idx_t = idx.permute(2, 0, 1, 3)  # [n_tiles, B, Hs, K], a view
    after = q_offset + n_tiles * T  # an unused slot's position: after every query
    q_start = q_offset + torch.arange(n_tiles, device=q.device) * T
    # Per tile, its key pattern (of the first head) and whether every head shares it, a cache-sized slab of tiles
    # at a time: index temporaries over all tiles at once (hundreds of MB at 32K) page-faulted more than they computed
    group = max(1, min(n_tiles, _CPU_GATHER_ELEMENTS // max(1, B * Hs * K * 2 * D)))
    slab = max(1, _CPU_GATHER_ELEMENTS // max(1, B * Hs * K))
    pattern = idx.new_empty(n_tiles, K)
    shared = []
    for a in range(0, n_tiles, slab):
        z = min(n_tiles, a + slab)
        rel = torch.where(idx_t[a:z] >= 0, idx_t[a:z], after).reshape(z - a, B * Hs, K)
        rel = rel.sub_(q_start[a:z, None, None]).clamp_(-1, T)
        pattern[a:z] = rel[:, 0]
        shared += ((rel == rel[:, :1]).flatten(1).all(1) & (rel[:, 0] <= 0).any(-1)).tolist()
    same = [False] + (pattern[1:] == pattern[:-1]).all(-1).tolist()  # tile t has tile t-1's pattern
    row = torch.arange(G * T, device=q.device) % T  # row r of a stacked tile is query r % T of the tile
    zero, minus_inf = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
    buffer = k.new_empty(group * B * Hs * K, 2 * D)
    scores = q.new_empty(group * B * Hs * G * T * K) if _products_for(q, G * T) else None  # _attend_tiles' logits
    bias, t0 = None, 0
    while t0 < n_tiles:
        t1 = t0 + 1  # a run: tiles of one shared pattern, or tiles whose heads differ (each row its own mask)
        while t1 < n_tiles and t1 - t0 < group and shared[t1] == shared[t0] and (same[t1] or not shared[t0]):
            t1 += 1
        N = (t1 - t0) * B * Hs
        rows = (idx_t[t0:t1].clamp(min=0) + base).reshape(-1)
        if together:
            gathered = torch.index_select(kv, 0, rows, out=buffer[: N * K]).view(N, 1, K, 2 * D)
            kk, vv = gathered[..., :D], gathered[..., D:]
        else:
            halves = buffer[: N * K].view(2, N * K, D)
            kk = torch.index_select(k_flat, 0, rows, out=halves[0]).view(N, 1, K, D)
            vv = torch.index_select(v_flat, 0, rows, out=halves[1]).view(N, 1, K, D)
        qq = qt[t0:t1].reshape(N, 1, G * T, D)
        if shared[t0]:
            if not (t0 and same[t0] and shared[t0 - 1]):  # a new pattern: its [G*T, K] mask, or none
                before = bool((pattern[t0] < 0).all())
                visible = pattern[t0][None, :] <= row[:, None]  # [G*T, K]
                bias = None if before else torch.where(visible, zero, minus_inf)[None, None]
                seen_by_all = pattern[t0] <= 0  # before the tile, or its first key: every row sees the column
                masked_from = K if bool(seen_by_all.all()) else int((~seen_by_all).to(torch.int8).argmax())
            o = _attend_tiles(qq[:, 0], kk[:, 0], vv[:, 0], bias, scale, scores, masked_from)
        else:
            k_rows = torch.where(idx_t[t0:t1] >= 0, idx_t[t0:t1], after).reshape(N, K)
            q_pos = (q_start[t0:t1, None] + row[None, :]).repeat_interleave(B * Hs, 0)  # [N, G*T]
            o = _attend_split(qq[:, 0], kk[:, 0], vv[:, 0], k_rows, q_pos, scale)
            if o is None:
                o = _attend(qq[:, 0], kk[:, 0], vv[:, 0], k_rows[:, None, :] <= q_pos[:, :, None], scale, None)
            bias = None
        out[t0:t1] = o.view(t1 - t0, B, Hs, G, T, D)
        t0 = t1
    return out_full.view(B, Hq, n_rows, D)[:, :, :Lq if total_rows is None else total_rows]


def _cpu_path(q, k, v, selection: Selection, softcap) -> bool:
    """Whether sparse_attention runs on _sparse_attention_cpu: CPU tensors, no soft-capping, no rule beyond causality,
    the flash kernel with its log-sum-exp there, one head size for q, k and v."""
    return not q.is_cuda and softcap is None and selection.keep is None and selection.window is None \
        and _flash_with_lse is not None and v.shape[-1] == q.shape[-1] and not getattr(selection, "block_size", None)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of each query on its selected keys only, exact within that set.

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; returns [B, Hq, Lq, Dv] in q's dtype. Causality is
    always enforced (key position <= query position); queries from `selection.dense_from` on read every key before
    them (dense attention). The Triton kernel runs where it applies; on the PyTorch path
    the tiles are processed in groups so that the temporaries stay O(T * K) per tile, never O(Lq * Lk).
    """
    if selection.dense_from is not None and selection.dense_from < q.shape[2]:
        # dense tail: its queries read every key before them; the tiles before it run on their key lists
        s = selection.dense_from
        tail = dense_attention(q[:, :, s:], k[:, :, :selection.q_offset + q.shape[2]],
                               v[:, :, :selection.q_offset + q.shape[2]], scale=scale, softcap=softcap)
        if s == 0:
            return tail
        if _cpu_path(q, k, v, selection, softcap) and s % selection.query_chunk == 0:
            # the tiles into an output with room for the tail: no concatenation (a second [B, Hq, Lq, D] tensor,
            # freshly allocated and written once more)
            head = selection.sparse_part()
            _split_heads(q, k, head.key_index.shape[1])
            out = _sparse_attention_cpu(q[:, :, :s], k, v, head.key_index, head.q_offset, head.query_chunk,
                                        q.shape[-1] ** -0.5 if scale is None else scale, total_rows=q.shape[2])
            out[:, :, s:] = tail
            return out
        head = sparse_attention(q[:, :, :s], k, v, selection.sparse_part(), scale=scale, softcap=softcap)
        return torch.cat([head, tail], dim=2)
    if q.is_cuda:  # Triton kernel that reads the selected keys in place (utils/kernels); None = not applicable
        out = kernels.try_sparse_attention(q, k, v, selection, scale=scale, softcap=softcap)
        if out is not None:
            return out
    if getattr(selection, "block_size", None):  # a block-mode KernelSelection: the PyTorch path reads key positions
        selection = block_selection_to_tokens(selection, k.shape[2])
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    idx = selection.key_index
    Hs, G = _split_heads(q, k, idx.shape[1])
    T, K = selection.query_chunk, idx.shape[-1]
    n_tiles = math.ceil(Lq / T)
    if idx.shape[0] != B or idx.shape[2] != n_tiles:
        raise ValueError(f"selection {tuple(idx.shape)} does not fit q {tuple(q.shape)} with query_chunk={T}")
    if n_tiles == 1:
        T = Lq  # one tile (a decode step): its Lq queries, not T rows padded with zero queries
    scale = D ** -0.5 if scale is None else scale
    Hkv = k.shape[1]
    if _cpu_path(q, k, v, selection, softcap):
        return _sparse_attention_cpu(q, k, v, idx, selection.q_offset, T, scale)

    # Queries as [B, Hs, n_tiles, G*T, D]: the G query heads that share a key list are stacked per tile.
    pad = n_tiles * T - Lq
    qt = F.pad(q, (0, 0, 0, pad)) if pad else q
    qt = qt.view(B, Hs, G, n_tiles, T, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hs, n_tiles, G * T, D)

    # Row r of a tile is query (r % T) of the tile; its absolute position, for the causal mask:
    row_pos = torch.arange(T, device=q.device).repeat(G)  # [G*T]
    # Flat views of K/V so that one index gathers rows of the right (batch, kv head) without repeating K/V.
    Dv = v.shape[-1]
    k_flat, v_flat = k.reshape(B * Hkv * Lk, D), v.reshape(B * Hkv * Lk, Dv)
    kv_head = torch.arange(Hs, device=q.device) // (Hs // Hkv)  # selection head -> kv head
    base = (torch.arange(B, device=q.device)[:, None] * Hkv + kv_head[None, :]) * Lk  # [B, Hs]

    out = torch.empty(B, Hs, n_tiles, G * T, Dv, dtype=q.dtype, device=q.device)
    per_tile = B * Hs * K * (G * T + D + Dv)
    # CPU groups (masked executor): large; its many small ops cost 3x wall time in small groups on a loaded 2-core box
    group = max(1, min(n_tiles, (_GROUP_ELEMENTS if q.is_cuda else _CPU_GROUP_ELEMENTS) // max(1, per_tile)))
    buffers = None
    for t0 in range(0, n_tiles, group):
        t1 = min(n_tiles, t0 + group)
        g = t1 - t0
        tile_idx = idx[:, :, t0:t1]  # [B, Hs, g, K]
        valid = tile_idx >= 0
        flat = base[:, :, None, None] + tile_idx.clamp(min=0)
        if q.is_cuda:
            kk = k_flat.index_select(0, flat.view(-1)).view(B, Hs, g, K, D)
            vv = v_flat.index_select(0, flat.view(-1)).view(B, Hs, g, K, Dv)
        else:  # into buffers reused by every group of the same size (a fresh one page-faults on every group)
            if buffers is None or buffers[0].shape[0] != flat.numel():
                buffers = (k.new_empty(flat.numel(), D), v.new_empty(flat.numel(), Dv))
            kk = torch.index_select(k_flat, 0, flat.view(-1), out=buffers[0]).view(B, Hs, g, K, D)
            vv = torch.index_select(v_flat, 0, flat.view(-1), out=buffers[1]).view(B, Hs, g, K, Dv)
        q_pos = selection.q_offset + (torch.arange(t0, t1, device=q.device)[:, None] * T + row_pos[None, :])  # [g, GT]
        # An unused slot gets a position after every query, so one comparison gives causality and validity.
        k_pos = torch.where(valid, tile_idx, Lq + selection.q_offset)[:, :, :, None, :]  # [B, Hs, g, 1, K]
        mask = k_pos <= q_pos[None, None, :, :, None]
        has_key = None
        if selection.keep is None and selection.window is None:
            # a row reads something iff the tile's smallest selected key is not after it
            first_key = torch.where(valid, tile_idx, Lk).amin(-1)  # [B, Hs, g]
            has_key = (first_key[..., None] <= q_pos[None, None]).reshape(-1, G * T)
        else:
            rule_q = selection.q_offset + (torch.arange(t0, t1, device=q.device)[:, None] * T
                                           + torch.arange(T, device=q.device)[None, :])[:, :, None]  # [g, T, 1]
            rule = selection.keep(rule_q, k_pos) if selection.keep is not None else torch.ones((), dtype=torch.bool,
                                                                                             device=q.device)
            if selection.window is not None:
                rule = rule & (rule_q - k_pos < selection.window)
            rule = rule.expand(B, Hs, g, T, K).repeat(1, 1, 1, G, 1)
            mask = mask & rule
        o = _attend(qt[:, :, t0:t1].reshape(-1, G * T, D), kk.reshape(-1, K, D), vv.reshape(-1, K, Dv),
                    mask.reshape(-1, G * T, K), scale, softcap, has_key)
        out[:, :, t0:t1] = o.view(B, Hs, g, G * T, Dv)

    out = out.view(B, Hs, n_tiles, G, T, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, n_tiles * T, Dv)
    return out[:, :, :Lq]


def _dense_tail_cpu(q, k, v, scale):
    """Causal attention of the last Lq < Lk queries on the CPU without an [Lq, Lk] mask: the keys before the first
    query are visible to every query (one unmasked flash call), the last Lq keys form a causal block (a small
    [G * Lq, Lq] mask, broadcast); the two merge by their log-sum-exp. The G query heads of a KV head are stacked."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, s = Hq // Hkv, Lk - Lq
    qs = q.reshape(B, Hkv, G * Lq, D)
    row = torch.arange(G * Lq, device=q.device) % Lq
    zero, minus_inf = (torch.tensor(x, dtype=q.dtype, device=q.device) for x in (0.0, float("-inf")))
    bias = torch.where(torch.arange(Lq, device=q.device)[None, :] <= row[:, None], zero, minus_inf)[None, None]
    out_b, lse_b = _flash_with_lse(qs, k[:, :, s:], v[:, :, s:], attn_mask=bias, scale=scale)
    out_a, lse_a = _flash_with_lse(qs, k[:, :, :s], v[:, :, :s], scale=scale)
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * torch.exp(lse_a - lse)[..., None] + out_b.float() * torch.exp(lse_b - lse)[..., None]
    return out.to(q.dtype).view(B, Hq, Lq, D)


def stacked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode query per head, q [B, Hq, 1, D], on every key of k, v [B, Hkv, Lk, D]: the G = Hq / Hkv query
    heads of a KV head go in as G queries of it (one query sees every key, so no mask), so K/V are read once per KV
    head and never repeated. SDPA as dispatched (a caller may pin its backend). Returns [B, Hq, 1, Dv]."""
    B, Hq, _, D = q.shape
    out = F.scaled_dot_product_attention(q.view(B, k.shape[1], Hq // k.shape[1], D), k, v, scale=scale)
    return out.view(B, Hq, 1, v.shape[-1])


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    attention_mask: torch.Tensor | None = None,
    window: int | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Exact causal attention. q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    Queries sit at positions Lk - Lq .. Lk - 1 (bottom-right aligned, as with a KV cache). `attention_mask`
    (bool [B or 1, 1, Lq, Lk], True = read) replaces the causal rule when given (e.g. transformers' padding or
    sliding-window mask); `window` keeps only keys with q_pos - k_pos < window. With soft-capping the math runs
    in query tiles of `query_chunk` to bound memory.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    _split_heads(q, k, Hkv)
    scale = D ** -0.5 if scale is None else scale
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask >= 0  # additive float mask: 0 = read, -inf/min = skip
    if softcap is None and attention_mask is None and window is None:
        if Lq == Lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)
        if Lq == 1:
            if not q.is_cuda and Hq != Hkv:  # SDPA's enable_gqa took 3-4.7x as long on the CPU (README, Latency, CPU)
                return stacked_decode_attention(q, k, v, scale)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=Hq != Hkv)
        if not q.is_cuda and _flash_with_lse is not None and v.shape[-1] == D and q.dtype == k.dtype \
                and Hq * Lq * Lq <= 1 << 24:  # the causal block's mask stays small (64 MB fp32 at most)
            return _dense_tail_cpu(q, k, v, scale)
    outs = []
    G = Hq // Hkv
    for s in range(0, Lq, query_chunk):
        e = min(Lq, s + query_chunk)
        if attention_mask is not None:
            mask = attention_mask[:, :, s:e, :]
        else:
            q_pos = torch.arange(Lk - Lq + s, Lk - Lq + e, device=q.device)[:, None]
            k_pos = torch.arange(Lk, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask = mask & (q_pos - k_pos < window)
            mask = mask[None, None]
        # GQA without repeating K/V: [B, Hkv, G*(e-s), D] queries against [B, Hkv, Lk, D] keys.
        qs = q[:, :, s:e].reshape(B, Hkv, G * (e - s), D)
        m = mask.expand(mask.shape[0], 1, e - s, Lk).repeat(1, 1, G, 1) if mask.shape[1] == 1 else mask
        m = m.expand(B, Hkv, G * (e - s), Lk)
        o = _attend(qs.reshape(B * Hkv, G * (e - s), D), k.reshape(B * Hkv, Lk, D),
                    v.reshape(B * Hkv, Lk, v.shape[-1]), m.reshape(B * Hkv, G * (e - s), Lk), scale, softcap)
        outs.append(o.view(B, Hq, e - s, v.shape[-1]))
    return torch.cat(outs, dim=2)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Exact causal sliding-window attention (a query reads the keys with q_pos - k_pos < window), in
    O(L * window) time and memory. q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    Gemma-2/3 local layers. Each query tile lists its window's T + window - 1 keys; the selection's `window`
    trims them per query. Tiles of T = query_chunk queries: 64 on the GPU (the kernel reads T + window - 1 keys
    per query), 256 on the CPU (the reference path gathers a copy of the keys per tile).
    """
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq == 1 or Lk <= window:  # decode, or a sequence inside one window: plain causal attention on a slice
        start = max(0, Lk - window) if Lq == 1 else 0
        return dense_attention(q, k[:, :, start:], v[:, :, start:], scale=scale, softcap=softcap)
    T = min(query_chunk or (64 if q.is_cuda else 256), Lq)
    n_tiles = math.ceil(Lq / T)
    q_offset = Lk - Lq
    tile_start = q_offset + torch.arange(n_tiles, device=q.device) * T
    first = tile_start - window + 1  # earliest key any query of the tile may read (may be negative)
    idx = first[:, None] + torch.arange(T + window - 1, device=q.device)[None, :]
    idx = torch.where((idx >= 0) & (idx < Lk), idx, -1)
    selection = Selection(idx.expand(q.shape[0], k.shape[1], n_tiles, idx.shape[-1]), T, q_offset, window=window)
    return sparse_attention(q, k, v, selection, scale=scale, softcap=softcap)


__all__ = ["sparse_attention", "dense_attention", "stacked_decode_attention", "sliding_window_attention"]
