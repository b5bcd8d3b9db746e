"""DHSA: Dynamic Hierarchical Sparse Attention (paper §3, Algorithms 1 and 2, App. D SDPA path).

What it keeps. Keys are cut into variable-length chunks at `boundaries`. Each chunk gets one vector, the
length-normalised sum sqrt(len)/len * sum(k) (eq. 4), so that long and short chunks compete fairly. Queries
are cut into tiles of `query_chunk` consecutive tokens that share one key selection (App. D). A tile scores
each chunk by the best-matching query of the tile (`query_pooling="max"`), or by the tile's mean query, eq. 4
applied to the tile (`"mean"`, the authors' code). The chunk similarity S_c is upsampled to tokens (every key
inherits its chunk's score) and each tile keeps its top-N_b keys among those it may see causally. Always
kept: the first `sink_tokens` keys (attention sinks) and the `local_tokens` keys just before the tile's end;
the local window takes at most half of N_b and the sinks at most half of the rest. Attention then runs only on the kept keys, with an exact causal mask,
so no query reads more than N_b keys.

Why max pooling and small tiles by default: a tile's mean query averages the logits of all its queries, so
the few queries that need a distant span (a question about a needle) are outvoted by the rest. On
gemma-3-270m needle-in-a-haystack at 6.25% density, mean pooling over 256-query tiles retrieved the needle at
almost no depth while oracle top-K at the same budget retrieved it everywhere; max pooling over 64-query tiles
nearly closed that gap (README, "Design choices").

Always-kept keys: 64 sinks and the 128 keys before a tile's end (so with 64-query tiles every query reads at
least the 64 keys before it), like the authors' first block and diagonal band, so that no query depends on
the chunk scores to see its own recent context. (With dense decode they changed NIAH on Qwen2.5 and Gemma-3
within noise; a sparse decode step that dropped the newest tokens garbled Qwen2.5's answers.)

Heads. By default (`head_pooling="none"`) every query head selects its own keys: with grouped-query attention
the heads of a group look for different things (one retrieval head among six), and a shared selection made
from their summed queries outvoted it (Gemma-3 NIAH 8K-32K: 16/30 -> 27/30 exact needles; README). K/V are
still read in place, never repeated per head. `head_pooling="mean"` (summed queries) or `"max"` (best head)
give one selection per KV head instead, which gathers K/V once per group; `share_heads=True` averages all
heads into one selection, as the authors' code does.

Decode (Algorithm 2, `decode="sparse"`). The prompt keeps its chunks; the tokens generated so far form one
extra chunk and the current token its own; the current token's query scores these chunks and keeps its
top-N_b keys; the generated tokens and the local window are always kept. With `decode="dense"` (default,
the authors' evaluation) decode steps read every key and only the prefill is sparse.

Memory. Chunk sums are prefix sums taken in slices (fp32); token scores exist for a group of query tiles at a
time; the selection is [B, H, L/T, N_b] indices. Nothing of size L x L is ever built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import Selection, sparse_attention
from .boundaries import FixedSizeBoundaries, as_boundary_list
from .config import SparseAttentionConfig

_PREFIX_SLICE = 8192        # keys per slice of the fp32 prefix sum
_SCORE_ELEMENTS = 1 << 24   # token scores held at once (per group of query tiles)


def chunk_vectors(k: torch.Tensor, ends: torch.Tensor, robust: bool = True) -> torch.Tensor:
    """Chunk keys of one sequence. k: [H, L, D], ends: [Nc] chunk ends -> [H, Nc, D] fp32.

    robust: sqrt(len)/len * sum (eq. 4); else the plain mean (ablation "w/o robust chunk repr.").
    The sums come from fp32 prefix sums P (P[0] = 0, P[j] = k_0 + ... + k_{j-1}): sum of [s, e) = P[e] - P[s].
    """
    H, L, D = k.shape
    positions = torch.cat([ends.new_zeros(1), ends])  # every prefix position that is needed: 0 and the ends
    prefix = torch.zeros(H, positions.numel(), D, dtype=torch.float32, device=k.device)
    carry = torch.zeros(H, 1, D, dtype=torch.float32, device=k.device)
    for s in range(0, L, _PREFIX_SLICE):
        e = min(L, s + _PREFIX_SLICE)
        running = torch.cumsum(k[:, s:e], dim=1, dtype=torch.float32) + carry  # P[s+1 .. e]
        lo, hi = torch.searchsorted(positions, torch.tensor([s + 1, e + 1], device=k.device)).tolist()
        if hi > lo:
            prefix[:, lo:hi] = running[:, positions[lo:hi] - 1 - s]
        carry = running[:, -1:]
    sums = prefix[:, 1:] - prefix[:, :-1]
    lengths = (positions[1:] - positions[:-1]).to(torch.float32)
    weight = lengths.rsqrt() if robust else lengths.reciprocal()
    return sums * weight[None, :, None]


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
                            head_pooling: str = "mean", centring=None) -> torch.Tensor:
    """S_c with max pooling over a tile: every chunk is scored by the tile query that matches it best.

    q: [Hq, Lq, D] (one sequence); chunk_k: [H, Nc, D] with H = Hkv (or 1: all heads share). head_pooling:
    "mean" averages the queries of a GQA group first (one score per query position); "max" scores every
    query head on its own and keeps the best head, so that a chunk wanted by one head of the group (a
    retrieval head) is not outvoted by the group's other heads. Returns [H, n_tiles, Nc] fp32. Cost Lq * Nc
    dot products per head ("max": per query head), done a few tiles at a time. centring: (key_mean, weight) of
    tile_key_means; every query's score of chunk c then drops weight[c] * (q . key_mean[tile]).
    """
    Hq, Lq, D = q.shape
    H, Nc, _ = chunk_k.shape
    T, G = query_chunk, Hq // H
    n_tiles = math.ceil(Lq / T)
    out = torch.empty(H, n_tiles, Nc, dtype=torch.float32, device=q.device)
    per_row = H * Nc * (G if head_pooling == "max" else 1)
    step = max(1, _SCORE_ELEMENTS // max(1, T * per_row))  # tiles per slice
    for t0 in range(0, n_tiles, step):
        t1 = min(n_tiles, t0 + step)
        rows = q[:, t0 * T: min(Lq, t1 * T)]
        n = rows.shape[1]
        per_head = rows.reshape(H, G, n, D).float()
        if head_pooling == "mean":
            per_head = per_head.sum(1, keepdim=True)  # GQA group sum: [H, 1, rows, D]
        scores = torch.matmul(per_head, chunk_k[:, None].transpose(-1, -2))  # [H, G or 1, rows, Nc]
        if centring is not None:
            key_mean, weight = centring
            tile_of_row = torch.arange(n, device=q.device) // T + t0
            shift = (per_head * key_mean[:, None, tile_of_row]).sum(-1)  # q . m_t per row: [H, G or 1, rows]
            scores = scores - shift[..., None] * weight
        scores = scores.amax(1)  # best head of the group ("max"), or the one group sum
        pad = (t1 - t0) * T - rows.shape[1]
        if pad:
            scores = F.pad(scores, (0, 0, 0, pad), value=float("-inf"))
        out[:, t0:t1] = scores.view(H, t1 - t0, T, Nc).amax(2)
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


def dhsa_select(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    budget: int,
    boundaries: list[torch.Tensor],
    query_chunk: int = 64,
    robust: bool = True,
    sink_tokens: int = 64,
    local_tokens: int = 128,
    share_heads: bool = False,
    query_pooling: str = "max",
    head_pooling: str = "none",
    center_keys: bool = True,
) -> Selection:
    """Token-level top-N_b key selection per query tile (Algorithm 1; Algorithm 2 when Lq == 1).

    query_pooling: how a tile scores a chunk: "max" over its queries (the tile keeps what any of its queries
    ranks high), or "mean" (the tile's mean query, eq. 4 applied to the tile, as in the authors' code).
    head_pooling: how the query heads that share one selection (a GQA group, or all heads with share_heads)
    are combined: "mean" (their queries are averaged before scoring) or "max" (each head scores the chunks
    and the best head counts); "none": no sharing, every query head selects its own keys (Selection with
    Hq heads; K/V are still read in place, not repeated).
    center_keys: score chunks against keys centred on their causal mean (tile_key_means), so that chunk
    length does not bias the ranking.

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D] with queries at positions Lk - Lq .. Lk - 1; boundaries: one
    ascending chunk-end tensor per batch item (last end = Lk). Returns a Selection with key_index
    [B, Hkv (Hq with head_pooling="none"), n_tiles, min(budget, Lk)] (-1 = unused slot, where a tile sees fewer
    than N_b keys).
    """
    if head_pooling not in ("max", "mean", "none"):
        raise ValueError(f"head_pooling must be 'max', 'mean' or 'none', got {head_pooling!r}")
    if head_pooling == "none" and not share_heads and q.shape[1] != k.shape[1]:
        # One selection per query head: score each head against its KV head's chunks, alone. The keys are
        # expanded for scoring only; the Selection has Hq heads and attention reads K/V in place.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if head_pooling == "none":
        head_pooling = "mean"  # a group of one query head: its mean is itself
    if q.is_cuda and head_pooling == "mean":  # fused GPU selection (utils/kernels/select.py), same kept set up to
        # ties; None = not applicable
        from .kernels import try_dhsa_select
        fused = try_dhsa_select(q, k, budget=budget, boundaries=boundaries, query_chunk=query_chunk, robust=robust,
                                sink_tokens=sink_tokens, local_tokens=local_tokens, share_heads=share_heads,
                                query_pooling=query_pooling, center_keys=center_keys)
        if fused is not None:
            return fused
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    T = query_chunk
    n_tiles = math.ceil(Lq / T)
    q_offset = Lk - Lq
    K = min(budget, Lk)
    device = q.device

    if query_pooling not in ("max", "mean"):
        raise ValueError(f"query_pooling must be 'max' or 'mean', got {query_pooling!r}")
    heads = 1 if share_heads else Hkv
    if query_pooling == "mean":
        if head_pooling == "max":  # one tile vector per query head, grouped by the head that selects for it
            q_vec = query_tile_vectors(q, Hq, T, robust).view(B, heads, Hq // heads, n_tiles, D)
        else:
            q_vec = query_tile_vectors(q, Hkv, T, robust)  # [B, Hkv, n_tiles, D]
            if share_heads:
                q_vec = q_vec.mean(dim=1, keepdim=True)

    # Per tile: keys visible to its last query (tile_end), its budget and its always-kept keys.
    tile_end = q_offset + torch.clamp(torch.arange(1, n_tiles + 1, device=device) * T, max=Lq)  # [n_tiles]
    tile_budget = torch.clamp(tile_end, max=budget)
    sink, local = forced_key_counts(tile_budget, sink_tokens, local_tokens)
    key_pos = torch.arange(Lk, device=device)

    key_index = torch.empty(B, Hkv, n_tiles, K, dtype=torch.long, device=device)
    group = max(1, min(n_tiles, _SCORE_ELEMENTS // max(1, heads * Lk)))
    for b in range(B):
        ends = boundaries[b]
        keys = k[b].float().mean(0, keepdim=True) if share_heads else k[b]
        chunk_k = chunk_vectors(keys, ends, robust)  # [heads, Nc, D]
        centring = tile_key_means(chunk_k, ends, tile_end, robust) if center_keys else None
        if query_pooling == "mean":
            vec = q_vec[b] if head_pooling == "max" else q_vec[b][:, None]  # [heads, G or 1, n_tiles, D]
            chunk_scores = torch.einsum("hgtd,hcd->hgtc", vec, chunk_k)
            if centring is not None:
                shift = (vec * centring[0][:, None]).sum(-1)  # [heads, G or 1, n_tiles]
                chunk_scores = chunk_scores - shift[..., None] * centring[1]
            chunk_scores = chunk_scores.amax(1)  # S_c: [heads, n_tiles, Nc]
        else:
            chunk_scores = max_pooled_chunk_scores(q[b], chunk_k, T, head_pooling, centring)
        chunk_of_key = torch.searchsorted(ends, key_pos, right=True)  # key j lies in chunk chunk_of_key[j]
        for t0 in range(0, n_tiles, group):
            t1 = min(n_tiles, t0 + group)
            scores = chunk_scores[:, t0:t1][:, :, chunk_of_key]  # upsample to tokens: [heads, g, Lk]
            end, s, l = tile_end[t0:t1, None], sink[t0:t1, None], local[t0:t1, None]
            visible = key_pos[None, :] < end
            forced = visible & ((key_pos[None, :] < s) | (key_pos[None, :] >= end - l))
            scores = scores.masked_fill(forced, float("inf")).masked_fill(~visible, float("-inf"))
            top, idx = torch.topk(scores, K, dim=-1, sorted=False)
            idx = torch.where(top == float("-inf"), Lk, idx)  # slots beyond what the tile can see
            idx = torch.sort(idx, dim=-1).values
            key_index[b, :, t0:t1] = torch.where(idx == Lk, -1, idx)  # broadcasts over heads if shared
    return Selection(key_index, T, q_offset)


def decode_boundaries(prompt_ends: torch.Tensor, prompt_len: int, num_keys: int) -> torch.Tensor:
    """Algorithm 2: the prompt's chunks, then [prompt_len, L'-1) (generated so far) and [L'-1, L')."""
    kept = prompt_ends[prompt_ends <= min(prompt_len, num_keys - 1)]
    tail = [num_keys] if num_keys - 1 == 0 or (kept.numel() and kept[-1].item() == num_keys - 1) \
        else [num_keys - 1, num_keys]
    return torch.cat([kept, torch.tensor(tail, dtype=torch.long, device=prompt_ends.device)])


def dhsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    budget: int | None = None,
    density: float | None = None,
    boundaries=None,
    query_chunk: int = 64,
    scale: float | None = None,
    softcap: float | None = None,
    **options,
) -> torch.Tensor:
    """DHSA attention for one layer. q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    Causal, queries at positions Lk - Lq .. Lk - 1. The budget is `budget` keys (N_b) or `density` * Lk.
    boundaries: chunk end indices, 1-D (shared by the batch), [B, Nc], or a list of 1-D; None uses uniform
    chunks of `chunk_size` (16) keys until learned boundaries are given. Other `options` are fields of
    SparseAttentionConfig (min_budget, chunk_size, max_chunks, robust_chunk_repr, sink_tokens, local_tokens,
    share_heads, query_pooling, head_pooling, center_keys).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected q [B, Hq, L, D] and k, v [B, Hkv, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} (same B and D, Lq <= Lk)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if budget is None and density is None:
        raise ValueError("dhsa_attention needs budget= (keys per query) or density= (budget / length)")
    cfg = SparseAttentionConfig(method="dhsa", budget=budget, density=density, query_chunk=query_chunk, **options)
    Lk = k.shape[2]
    if boundaries is None:
        ends = FixedSizeBoundaries(cfg.chunk_size if cfg.max_chunks is None else None)(k, cfg.num_chunks(Lk))
    else:
        ends = as_boundary_list(boundaries, k.shape[0], Lk, device=k.device)
    selection = dhsa_select(q, k, budget=cfg.resolve_budget(Lk), boundaries=ends, query_chunk=cfg.query_chunk,
                            robust=cfg.robust_chunk_repr, sink_tokens=cfg.sink_tokens,
                            local_tokens=cfg.local_tokens, share_heads=cfg.share_heads,
                            query_pooling=cfg.query_pooling, head_pooling=cfg.head_pooling,
                            center_keys=cfg.center_keys)
    return sparse_attention(q, k, v, selection, scale=scale, softcap=softcap)


__all__ = ["dhsa_attention", "dhsa_select", "chunk_vectors", "tile_key_means", "query_tile_vectors", "decode_boundaries",
           "forced_key_counts"]
