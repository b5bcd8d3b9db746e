"""The arithmetic of DHSA's key selection (paper §3, eq. 4), shared by the PyTorch selection (utils/methods/dhsa/select.py) and the
fused GPU selection (utils/methods/dhsa/fused.py): chunk vectors, query-tile vectors, the causal key means that centre
the chunk scores, max-pooled chunk scores, the always-kept key counts, and the chunks of a decode step
(Algorithm 2). PyTorch only; imports no other module of the project.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_PREFIX_SLICE = 8192        # keys per slice of the fp32 prefix sum
SCORE_ELEMENTS = 1 << 24    # scores held at once (per slice of query tiles; utils/methods/dhsa/select.py too)
_CPU_SCORE_ELEMENTS = 1 << 21  # CPU: per-query chunk scores of one slice (8 MB fp32): the passes after the GEMM
                               # (centring, max over the tile) read them from cache, and no slice page-faults


def chunk_vectors(k: torch.Tensor, ends: torch.Tensor, robust: bool = True) -> torch.Tensor:
    """Chunk keys of one sequence. k: [H, L, D], ends: [Nc] chunk ends -> [H, Nc, D] fp32.

    robust: sqrt(len)/len * sum (eq. 4); else the plain mean (ablation "w/o robust chunk repr.").
    The sums come from fp32 prefix sums P (P[0] = 0, P[j] = k_0 + ... + k_{j-1}): sum of [s, e) = P[e] - P[s].
    """
    positions = torch.cat([ends.new_zeros(1), ends])  # every prefix position that is needed: 0 and the ends
    prefix = prefix_sums(k, positions)
    sums = prefix[:, 1:] - prefix[:, :-1]
    lengths = (positions[1:] - positions[:-1]).to(torch.float32)
    weight = lengths.rsqrt() if robust else lengths.reciprocal()
    return sums * weight[None, :, None]


def softmax_pooled_chunk_scores(q: torch.Tensor, k: torch.Tensor, ends: torch.Tensor, query_chunk: int,
                                pool: str, head_pooling: str = "mean", q_offset: int = 0) -> torch.Tensor:
    """S_c from per-query chunk probabilities (query_pooling "softmax_max" / "softmax_mean").

    Every query q scores each chunk it can see (start <= its position) by log p_qc = q . mu_c / sqrt(D) + log len_c
    - lse over those chunks (mu_c: the chunk's mean key; len_c similar keys get len_c times one key's weight), the
    chunk-level softmax weight that token rescoring takes key by key. A tile then pools its queries: pool "max" keeps
    the best query's log p, "mean" the log of the mean p (the tile's estimated attention mass on the chunk).
    q: [Hq, Lq, D], k: [H, Lk, D] (one sequence), ends [Nc]. head_pooling as max_pooled_chunk_scores. Returns
    [H, n_tiles, Nc] fp32; chunks a tile cannot see score -inf. A per-query shift of the keys (center_keys) cancels.
    """
    Hq, Lq, D = q.shape
    H = k.shape[0]
    T, G = query_chunk, Hq // H
    n_tiles = math.ceil(Lq / T)
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    mu = chunk_vectors(k, ends, robust=False) * D ** -0.5  # [H, Nc, D]
    log_len = lengths.to(torch.float32).log()
    starts = ends - lengths
    Nc = ends.numel()
    out = torch.full((H, n_tiles, Nc), float("-inf"), dtype=torch.float32, device=q.device)
    step = max(1, SCORE_ELEMENTS // max(1, T * H * Nc * (G if head_pooling == "max" else 1)))
    for t0 in range(0, n_tiles, step):
        t1 = min(n_tiles, t0 + step)
        rows = q[:, t0 * T: min(Lq, t1 * T)].float()
        n = rows.shape[1]
        per_head = rows.reshape(H, G, n, D)
        if head_pooling == "mean" and G > 1:
            per_head = per_head.sum(1, keepdim=True)
        logits = torch.einsum("hgrd,hcd->hgrc", per_head, mu) + log_len
        pos = q_offset + t0 * T + torch.arange(n, device=q.device)
        logits = logits.masked_fill(starts[None, :] > pos[:, None], float("-inf"))  # chunks after the query
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        tile = torch.arange(n, device=q.device) // T  # tile of each row within the slice
        g = t1 - t0
        pooled = torch.full(logp.shape[:2] + (g, Nc), float("-inf"), dtype=torch.float32, device=q.device)
        index = tile[None, None, :, None].expand_as(logp)
        if pool == "max":
            pooled = pooled.scatter_reduce(2, index, logp, "amax")
        else:  # log of the mean probability over the tile's rows
            count = torch.bincount(tile, minlength=g).to(torch.float32)
            top = pooled.scatter_reduce(2, index, logp, "amax").clamp(min=-1e30)  # stable log-mean-exp
            mean = torch.zeros_like(pooled).scatter_add_(2, index, (logp - top.gather(2, index)).exp())
            pooled = top + (mean / count[None, None, :, None]).log()
            pooled = pooled.masked_fill(mean == 0, float("-inf"))
        out[:, t0:t1] = pooled.amax(1)  # head_pooling "max": the best head of the group
    return out


def bound_chunk_keys(k: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per-chunk key bounds for chunk_score "bound": k [H, L, D], ends [Nc] -> [H, Nc, 2D] fp32, the elementwise
    max then min of each chunk's keys. With bound_queries(q) = [q+, -q-], their dot product is
    sum_d max(q_d kmax_d, q_d kmin_d): the largest q . k that any key inside the chunk's box could give (Quest)."""
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    keys = k.transpose(0, 1).float().contiguous()  # [L, H, D]: segment_reduce runs along the first dim
    high = torch.segment_reduce(keys, "max", lengths=lengths, axis=0)
    low = torch.segment_reduce(keys, "min", lengths=lengths, axis=0)
    return torch.cat([high, low], dim=-1).transpose(0, 1).contiguous()


def bound_queries(q: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., 2D] fp32: [max(q, 0), min(q, 0)], the query side of the chunk bound (bound_chunk_keys)."""
    q = q.float()
    return torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)


def bound_centring(k: torch.Tensor, ends: torch.Tensor, tile_end: torch.Tensor):
    """centring for the bound scores: the bound on keys centred on the tile's causal mean key m_t is the bound
    minus q . m_t; [q+, q-] . [m_t, m_t] = q . m_t. Returns (key_mean [H, n_tiles, 2D], weight [Nc] = 1)."""
    key_mean, weight = tile_key_means(chunk_vectors(k, ends, robust=False), ends, tile_end, robust=False)
    return torch.cat([key_mean, key_mean], dim=-1), weight


def prefix_sums(k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 prefix sums P[p] = k_0 + ... + k_{p-1} of k [H, L, D] at ascending `positions` -> [H, n, D].

    P comes from cumsums over slices of _PREFIX_SLICE keys at fixed absolute offsets, each slice carrying the
    last P of the one before, so P[p] depends on the keys before p only (not on L): DecodeChunks (utils/methods/dhsa/select.py)
    extends it key by key to the same numbers (on the CPU, cumsum accumulates in float64)."""
    H, L, D = k.shape
    prefix = torch.zeros(H, positions.numel(), D, dtype=torch.float32, device=k.device)
    carry = torch.zeros(H, 1, D, dtype=torch.float32, device=k.device)
    for s in range(0, L, _PREFIX_SLICE):
        e = min(L, s + _PREFIX_SLICE)
        running = torch.cumsum(k[:, s:e], dim=1, dtype=torch.float32) + carry  # P[s+1 .. e]
        lo, hi = torch.searchsorted(positions, torch.tensor([s + 1, e + 1], device=k.device)).tolist()
        if hi > lo:
            prefix[:, lo:hi] = running[:, positions[lo:hi] - 1 - s]
        carry = running[:, -1:]
    return prefix


def query_tile_vectors(q: torch.Tensor, num_kv_heads: int, query_chunk: int, robust: bool = True) -> torch.Tensor:
    """Query-tile vectors. q: [B, Hq, L, D] -> [B, Hkv, n_tiles, D] fp32 (mean over the GQA group and the tile,
    times sqrt(tile length) if robust, as eq. 4)."""
    B, Hq, L, D = q.shape
    G, T = Hq // num_kv_heads, query_chunk
    n_full, rest = divmod(L, T)
    parts = []
    if n_full:
        full = q[:, :, : n_full * T].reshape(B, num_kv_heads, G, n_full, T, D)
        parts.append(full.sum(dim=(2, 4), dtype=torch.float32) / (G * T) * (math.sqrt(T) if robust else 1.0))
    if rest:
        tail = q[:, :, n_full * T:].reshape(B, num_kv_heads, G, rest, D)
        vec = tail.sum(dim=(2, 3), dtype=torch.float32) / (G * rest) * (math.sqrt(rest) if robust else 1.0)
        parts.append(vec[:, :, None])
    return torch.cat(parts, dim=2)


def tile_key_means(chunk_k: torch.Tensor, ends: torch.Tensor, tile_end: torch.Tensor, robust: bool = True):
    """Causal mean key per query tile, for centring the chunk scores (`center_keys`).

    A chunk vector is w(len) * sum of its keys (w = 1/sqrt(len) if robust, else 1/len), so a component m that all
    keys share adds len * w(len) * (q . m) to a chunk's score: with variable-length chunks and the robust weight,
    long chunks win whenever q . m > 0, whatever they contain. Token attention is blind to m (softmax ignores a
    shift shared by all keys), so the scores subtract it: S_c - len_c * w(len_c) * (q . m_t), with m_t the mean
    key of the chunks that end before tile t's last key (chunk 0, the attention sink, left out): causal.

    chunk_k: [H, Nc, D] fp32 (chunk_vectors), ends: [Nc], tile_end: [n_tiles] (keys visible to each tile's last
    query). Returns key_mean [H, n_tiles, D] fp32 and weight [Nc] = len * w(len).
    """
    lengths = torch.diff(ends, prepend=ends.new_zeros(1)).to(torch.float32)
    weight = lengths.sqrt() if robust else torch.ones_like(lengths)
    sums = chunk_k / (lengths.rsqrt() if robust else lengths.reciprocal())[None, :, None]  # plain key sums
    # keys of chunks 0..c, scanned along the last dim (CUDA scans a middle dim one thread per column: slow)
    prefix = torch.cumsum(sums.transpose(1, 2).contiguous(), dim=-1)  # [H, D, Nc]
    done = torch.searchsorted(ends, tile_end.to(ends.dtype), right=True)  # chunks wholly visible to the tile
    last = (done - 1).clamp(min=0)
    count = (ends[last] - ends[0]).to(torch.float32)  # keys in chunks 1..done-1
    key_sum = (prefix[:, :, last] - prefix[:, :, :1]).transpose(1, 2)  # [H, n_tiles, D]
    key_mean = torch.where((count > 0)[None, :, None], key_sum / count.clamp(min=1)[None, :, None], 0.0)
    return key_mean, weight


def max_pooled_chunk_scores(q: torch.Tensor, chunk_k: torch.Tensor, query_chunk: int,
                            head_pooling: str = "mean", centring=None, chunk_starts: torch.Tensor | None = None,
                            tile_end: torch.Tensor | None = None) -> torch.Tensor:
    """S_c with max pooling over a tile: every chunk is scored by the tile query that matches it best.

    q: [Hq, Lq, D] (one sequence); chunk_k: [H, Nc, D] with H = Hkv (or 1: all heads share). head_pooling:
    "mean" averages the queries of a GQA group first (one score per query position); "max" scores every
    query head on its own and keeps the best head, so that a chunk wanted by one head of the group (a
    retrieval head) is not outvoted by the group's other heads. Returns [H, n_tiles, Nc] fp32. Cost Lq * Nc
    dot products per head ("max": per query head), done a few tiles at a time. centring: (key_mean, weight) of
    tile_key_means; every query's score of chunk c then drops weight[c] * (q . key_mean[tile]).

    chunk_starts [Nc] and tile_end [n_tiles] (keys visible to each tile), optional: a slice of tiles then scores
    only the chunks that start before its last tile's end (causal: about half the dot products) and gives the
    others -inf, which no tile can see anyway. The scores of the visible chunks are the same numbers either way.
    """
    Hq, Lq, D = q.shape
    H, Nc, _ = chunk_k.shape
    T, G = query_chunk, Hq // H
    n_tiles = math.ceil(Lq / T)
    out = torch.empty(H, n_tiles, Nc, dtype=torch.float32, device=q.device)
    per_row = H * Nc * (G if head_pooling == "max" else 1)
    step = max(1, SCORE_ELEMENTS // max(1, T * per_row))  # tiles per slice
    causal = chunk_starts is not None and tile_end is not None
    if causal:  # smaller slices skip more of the causally hidden chunks (and stay in cache on the CPU)
        step = max(1, min(step, math.ceil(n_tiles / 16)))
        if not q.is_cuda:
            step = max(1, min(step, _CPU_SCORE_ELEMENTS // max(1, T * per_row)))
        seen = torch.searchsorted(chunk_starts, tile_end.to(chunk_starts.dtype)).tolist()  # chunks a tile sees
    for t0 in range(0, n_tiles, step):
        t1 = min(n_tiles, t0 + step)
        nc = seen[t1 - 1] if causal else Nc  # chunks scored for this slice
        rows = q[:, t0 * T: min(Lq, t1 * T)]
        n = rows.shape[1]
        per_head = rows.reshape(H, G, n, D).float()
        if head_pooling == "mean" and G > 1:
            per_head = per_head.sum(1, keepdim=True)  # GQA group sum: [H, 1, rows, D]
        keys_t = chunk_k[:, None, :nc].transpose(-1, -2)  # [H, 1, D, nc]
        shift = None
        if centring is not None:
            key_mean, weight = centring
            tile_of_row = torch.arange(n, device=q.device) // T + t0
            shift = (per_head * key_mean[:, None, tile_of_row]).sum(-1)  # q . m_t per row: [H, G or 1, rows]
        if not q.is_cuda:
            # CPU: the scores transposed, [chunks, rows] (the GEMM runs ~25% faster with the long side first and
            # the max over a tile's rows reads contiguous memory); with centring q.c is added by the GEMM (beta =
            # 1) onto -(weight * shift): the same numbers as the product minus the shift, one pass less
            Gs = per_head.shape[1]  # the heads of a group side by side as columns: one GEMM per selecting head
            if Gs * n < 16 and chunk_k.stride(1) == 1:
                # a decode step's few rows against chunk vectors kept transposed (DecodeChunks): rows x D times
                # D x chunks, the layout the GEMM runs well with one row
                scores_t = torch.bmm(per_head.reshape(H, Gs * n, D), chunk_k.transpose(1, 2)[:, :, :nc])
                scores_t = scores_t.transpose(1, 2)
                if shift is not None:
                    scores_t = scores_t - weight[:nc, None] * shift.reshape(H, 1, Gs * n)
            elif shift is None:
                rows_t = per_head.permute(0, 3, 1, 2).reshape(H, D, Gs * n)
                scores_t = torch.bmm(chunk_k[:, :nc], rows_t)
            else:
                rows_t = per_head.permute(0, 3, 1, 2).reshape(H, D, Gs * n)
                scores_t = torch.mul(-weight[:nc, None], shift.reshape(H, 1, Gs * n))
                scores_t.baddbmm_(chunk_k[:, :nc], rows_t)
            scores_t = scores_t.view(H, nc, Gs, n)
            scores_t = scores_t.amax(2) if Gs > 1 else scores_t[:, :, 0]  # [H, nc, rows]
            pad = (t1 - t0) * T - n
            if pad and t1 - t0 == 1:  # one short tile (a decode step): its rows' max, no padding to T rows
                out[:, t0, :nc] = scores_t.amax(-1)
            else:
                if pad:
                    scores_t = F.pad(scores_t, (0, pad), value=float("-inf"))
                out[:, t0:t1, :nc] = scores_t.view(H, nc, t1 - t0, T).amax(-1).transpose(1, 2)
            if nc < Nc:
                out[:, t0:t1, nc:] = float("-inf")
            continue
        scores = torch.matmul(per_head, keys_t)  # [H, G or 1, rows, nc]
        if shift is not None:
            scores.sub_(shift[..., None] * weight[:nc])
        scores = scores.amax(1) if scores.shape[1] > 1 else scores[:, 0]  # best head of the group, or the one
        pad = (t1 - t0) * T - rows.shape[1]
        if pad and t1 - t0 == 1:  # one short tile (a decode step): its rows' max, no padding to T rows
            out[:, t0, :nc] = scores.amax(1)
            if nc < Nc:
                out[:, t0:t1, nc:] = float("-inf")
            continue
        if pad:
            scores = F.pad(scores, (0, 0, 0, pad), value=float("-inf"))
        out[:, t0:t1, :nc] = scores.view(H, t1 - t0, T, nc).amax(2)
        if nc < Nc:
            out[:, t0:t1, nc:] = float("-inf")
    return out


def forced_key_counts(budget_per_tile: torch.Tensor, sink_tokens: int, local_tokens: int):
    """Sink and local keys kept without scoring, per tile: the local window takes at most half of the tile's
    budget and the sinks at most half of the rest, so at least a quarter of N_b is always chosen by the chunk
    scores; key 0 is kept whenever sinks are on, so that every query of a tile reads at least one key."""
    local = torch.clamp(budget_per_tile // 2, max=local_tokens)
    sink = torch.clamp((budget_per_tile - local) // 2, max=sink_tokens)
    if sink_tokens > 0:
        sink = torch.maximum(sink, torch.clamp(budget_per_tile - local, max=1))
    return sink, local


def rescored_slots(window: int, budget: int, forced: int) -> int:
    """rescore_window: the slots of a budget that token rescoring decides, at most `window` and never the `forced`
    (sink, local, ranked) keys; 0 = every slot (the plain refinement), also when nothing is forced and the budget
    fits in the window."""
    slots = max(0, min(window, budget - forced)) if window else 0
    return 0 if slots >= budget else slots


def decode_boundaries(prompt_ends: torch.Tensor, prompt_len: int, num_keys: int) -> torch.Tensor:
    """Algorithm 2: the prompt's chunks, then [prompt_len, L'-1) (generated so far) and [L'-1, L')."""
    kept = prompt_ends[prompt_ends <= min(prompt_len, num_keys - 1)]
    tail = [num_keys] if num_keys - 1 == 0 or (kept.numel() and kept[-1].item() == num_keys - 1) \
        else [num_keys - 1, num_keys]
    return torch.cat([kept, torch.tensor(tail, dtype=torch.long, device=prompt_ends.device)])


__all__ = ["chunk_vectors", "prefix_sums", "query_tile_vectors", "tile_key_means", "max_pooled_chunk_scores", "forced_key_counts", "rescored_slots",
           "decode_boundaries", "SCORE_ELEMENTS"]
