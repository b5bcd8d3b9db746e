"""DHSA: Dynamic Hierarchical Sparse Attention (paper §3, Algorithms 1 and 2, App. D SDPA path).

What it keeps. Keys are cut into variable-length chunks at `boundaries`. Each chunk gets one vector, the
length-normalised sum sqrt(len)/len * sum(k) (eq. 4), so that long and short chunks compete fairly. Queries
are cut into tiles of `query_chunk` consecutive tokens that share one key selection (App. D). A tile scores
each chunk by the best-matching query of the tile (`query_pooling="max"`), or by the tile's mean query, eq. 4
applied to the tile (`"mean"`, the authors' code). The chunk similarity S_c is upsampled to tokens (every key
inherits its chunk's score) and each tile keeps its top-N_b keys among those it may see causally. Always
kept: the first `sink_tokens` keys (attention sinks) and the `local_tokens` keys just before the tile's end;
the local window takes at most half of N_b and the sinks at most half of the rest. Attention then runs only on
the kept keys, with an exact causal mask, so no query reads more than N_b keys.

Why max pooling and small tiles by default: a tile's mean query averages the logits of all its queries, so
the few queries that need a distant span (a question about a needle) are outvoted by the rest; max pooling over
small tiles keeps them (the needle measurements: README, "Design choices").

Always-kept keys: 64 sinks and the 128 keys before a tile's end (so with 64-query tiles every query reads at
least the 64 keys before it), like the authors' first block and diagonal band, so that no query depends on
the chunk scores to see its own recent context (their effect on NIAH: README, "Design choices").

Heads. By default (`head_pooling="none"`) every query head selects its own keys: with grouped-query attention
the heads of a group look for different things (one retrieval head among six), and a shared selection made
from their summed queries outvoted it (README, "Design choices", has the needle counts). K/V are
still read in place, never repeated per head. `head_pooling="mean"` (summed queries) or `"max"` (best head)
give one selection per KV head instead, which gathers K/V once per group; `share_heads=True` averages all
heads into one selection, as the authors' code does.

Decode (Algorithm 2, `decode="sparse"`). The prompt keeps its chunks; the tokens generated so far form one
extra chunk and the current token its own; the current token's query scores these chunks and keeps its
top-N_b keys; the generated tokens and the local window are always kept. With `decode="dense"` (default,
the authors' evaluation) decode steps read every key and only the prefill is sparse.

Memory. Chunk sums are prefix sums taken in slices (fp32); token scores exist for a group of query tiles at a
time; the selection is [B, H, L/T, N_b] indices. Nothing of size L x L is ever built.

CPU speed-ups that keep the same keys (tests/test_cpu_fast_paths.py): the top-N_b is taken over whole chunks where
that is provably the token-level top-k (`_chunk_topk`: uniform chunks, no tie at the cut; else the token path), with
rescore_window one ranking of whole chunks gives both the kept keys and the band (`_whole_chunk_split`), and a
decode step takes the prompt's chunk vectors from the layer state (`DecodeChunks`) instead of the whole cache.

Where the parts live (utils/methods/dhsa/): the chunk and score arithmetic in scores.py (shared with the fused GPU
selection, fused.py), the options in utils/config.py (DHSAOptions), the per-layer plumbing of a patched model
(boundaries per forward, decode state, the setup hook) in __init__.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import utils.methods.dhsa.scores as dhsa_scores
from utils import kernels, sorting
from utils.attention import sparse_attention
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.kernels.head_dims import HEAD_DIMS
from utils.methods.dhsa.boundaries import FixedSizeBoundaries, as_boundary_list
from utils.methods.dhsa.scores import (chunk_vectors, forced_key_counts, max_pooled_chunk_scores, query_tile_vectors,
                                       tile_key_means)
from utils.selection import KernelSelection, Selection


def dhsa_select(q: torch.Tensor, k: torch.Tensor, *, budget: int, boundaries: list[torch.Tensor],
                options: DHSAOptions = DHSAOptions(), ranked_keys: torch.Tensor | None = None,
                ranked_share: float = 0.5, decode_cache: dict | None = None) -> Selection:
    """Token-level top-N_b key selection per query tile (Algorithm 1; Algorithm 2 when Lq == 1).

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D] with queries at positions Lk - Lq .. Lk - 1; budget: N_b keys;
    boundaries: one ascending chunk-end tensor per batch item (last end = Lk). Returns a Selection with key_index
    [B, Hkv (Hq with head_pooling="none"), n_tiles, min(budget, Lk)] (-1 = unused slot, where a tile sees fewer
    than N_b keys).

    options (DHSAOptions; defaults as SparseAttentionConfig):
    query_chunk: queries per tile, T. query_pooling: how a tile scores a chunk: "max" over its queries (the tile
    keeps what any of its queries ranks high), or "mean" (the tile's mean query, eq. 4 applied to the tile, as in
    the authors' code). head_pooling: how the query heads that share one selection (a GQA group, or all heads with
    share_heads) are combined: "mean" (their queries are averaged before scoring) or "max" (each head scores the
    chunks and the best head counts); "none": no sharing, every query head selects its own keys (Selection with
    Hq heads; K/V are still read in place, not repeated). center_keys: score chunks against keys centred on their
    causal mean (tile_key_means), so that chunk length does not bias the ranking. robust_chunk_repr, sink_tokens,
    local_tokens, share_heads: see the module docstring.

    dense_tail: the tiles holding the last dense_tail queries of a prefill read every visible key
    (Selection.dense_from; the one exception to the budget). ranked_keys: optional [B, Hs, M] keys ranked best
    first (-1 pads; Hs as the Selection's heads), e.g. the question's keys (tail_key_ranking) at a sparse decode
    step or as the vertical columns of a prefill (tail_columns): each tile keeps the first of them that it sees
    (and that are not sinks or local keys already) without scoring, as many as `ranked_share` of what its budget
    leaves after the sinks and the local window.

    decode_cache: optional dict {"prompt_len": int, "prompt_ends": [one tensor per batch item], "chunks": {}}
    held by the layer between decode steps (utils/methods/dhsa/__init__.py): on the CPU a decode step then takes the chunk
    vectors (and the centring) from DecodeChunks, extended by the keys added since the last step, instead of
    recomputing them over the whole cache; the same numbers, so the same kept keys.

    On CUDA the fused GPU selection (utils/methods/dhsa/fused.py) runs where it applies: the same kept set up to ties.
    """
    expand = 1
    if options.head_pooling == "none":
        if not options.share_heads and q.shape[1] != k.shape[1]:
            # One selection per query head: score each head against its KV head's chunks, alone. The chunk
            # vectors are repeated per query head for scoring only (`expand`); the Selection has Hq heads and
            # attention reads K/V in place.
            expand = q.shape[1] // k.shape[1]
        options = options.replace(head_pooling="mean")  # a group of one query head: its mean is itself
    if q.shape[2] == 1 and (options.exact_tail or options.dense_tail):
        # a decode step is no prefill tail: it keeps the cheap chunk scores and the budget
        options = options.replace(exact_tail=0, dense_tail=0)
    selection = _select(q, k, budget, boundaries, options, expand, ranked_keys, ranked_share, decode_cache)
    if options.dense_tail:  # the tiles holding the last dense_tail queries read every key (Selection.dense_from)
        selection.dense_from = max(0, (q.shape[2] - options.dense_tail) // options.query_chunk) * options.query_chunk
    return selection


def try_fused_select(q: torch.Tensor, k: torch.Tensor, *, budget: int, boundaries: list[torch.Tensor],
                     options: DHSAOptions) -> KernelSelection | None:
    """The fused GPU selection (utils/methods/dhsa/fused.py) for `dhsa_select` (same arguments, K one per query
    head), or None where it does not apply: it runs on CUDA tensors with the kernels on (`kernels.usable`), scores
    summed GQA groups (head_pooling "mean") by their chunk vectors (chunk_score "mean", query_pooling "max" or
    "mean"), has no exact tail (`_select` adds it on the PyTorch path), holds at most
    MAX_CHUNKS chunk scores per tile and, rescoring tokens, at most MAX_CANDIDATES candidates of a head dim the
    kernels take."""
    if not kernels.usable(q) or options.head_pooling != "mean" or options.exact_tail or options.chunk_score != "mean" \
            or options.query_pooling not in ("max", "mean"):
        return None
    from utils.methods.dhsa.fused import MAX_CHUNKS, dhsa_select_fused  # imports Triton
    from utils.methods.dhsa.fused_rescore import MAX_CANDIDATES

    if max(int(e.numel()) for e in boundaries) > MAX_CHUNKS:
        return None
    if options.token_rescore:
        width = min(k.shape[2], math.ceil(options.token_rescore * min(budget, k.shape[2])))
        if width > MAX_CANDIDATES or q.shape[-1] not in HEAD_DIMS:
            return None
    return dhsa_select_fused(q, k, budget=budget, boundaries=boundaries, options=options)


def _select(q: torch.Tensor, k: torch.Tensor, budget: int, boundaries: list[torch.Tensor], options: DHSAOptions,
            expand: int, ranked_keys: torch.Tensor | None = None, ranked_share: float = 0.5,
            decode_cache: dict | None = None) -> Selection:
    """The key lists of every tile: the fused GPU selection where it applies, else the PyTorch path."""
    if ranked_keys is not None or (decode_cache is not None and not q.is_cuda):
        # kept keys given from outside (columns, a decode step's question keys), or the CPU's chunk vectors kept
        # between decode steps
        return _select_on_pytorch(q, k, budget, boundaries, options, expand, ranked_keys, ranked_share, decode_cache)
    if q.is_cuda:  # None = the fused selection does not apply
        tail_only = options.exact_tail and q.shape[2] > options.exact_tail
        plain = options.replace(exact_tail=0) if tail_only else options
        k_heads = k.repeat_interleave(expand, dim=1) if expand > 1 else k  # the fused selection: one K per head
        fused = try_fused_select(q, k_heads, budget=budget, boundaries=boundaries, options=plain)
        if fused is not None:
            if tail_only:  # the fused kernel for every tile, then the exact tail tiles on the PyTorch path
                T = options.query_chunk
                first = (q.shape[2] - options.exact_tail) // T  # first exact tile
                tail = _select_on_pytorch(q[:, :, first * T:], k, budget, boundaries, options, expand)
                key_index, counts = fused.key_index.clone(), fused.counts.clone()  # (shared heads: expanded views)
                key_index[:, :, first:] = tail.key_index
                counts[:, :, first:] = (tail.key_index >= 0).sum(-1)
                fused = KernelSelection(key_index, T, fused.q_offset, counts=counts)
            return fused
    return _select_on_pytorch(q, k, budget, boundaries, options, expand)


def _select_on_pytorch(q: torch.Tensor, k: torch.Tensor, budget: int, boundaries: list[torch.Tensor],
                       options: DHSAOptions, expand: int = 1, ranked_keys: torch.Tensor | None = None,
                       ranked_share: float = 0.5, decode_cache: dict | None = None) -> Selection:
    """dhsa_select on the PyTorch path, with head_pooling "mean" or "max". expand: query heads per KV head that
    select alone (head_pooling "none"): chunk vectors are built per KV head, then repeated per query head.
    decode_cache: see dhsa_select."""
    T, robust, share_heads = options.query_chunk, options.robust_chunk_repr, options.share_heads
    query_pooling, head_pooling = options.query_pooling, options.head_pooling
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1] * expand, k.shape[2]  # heads that select (query heads when expand > 1)
    n_tiles = math.ceil(Lq / T)
    q_offset = Lk - Lq
    K = min(budget, Lk)
    device = q.device

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
    sink, local = forced_key_counts(tile_budget, options.sink_tokens, options.local_tokens)
    key_pos = torch.arange(Lk, device=device)
    if ranked_keys is not None:  # each tile keeps the first `extra` ranked keys it sees without scoring
        extra = torch.floor((tile_budget - sink - local).clamp(min=0) * ranked_share).long()

    # Candidates per tile before token rescoring: every visible key for the exact tail of a prefill (tiles from
    # first_exact on), token_rescore x N_b for the other tiles (N_b: no rescoring)
    first_exact = max(0, (Lq - options.exact_tail) // T) if options.exact_tail and Lq > 1 else n_tiles
    width_other = min(Lk, math.ceil(options.token_rescore * K)) if options.token_rescore else K
    # rescore_window: only the last C slots are rescored (never the sinks and the local window of the full budget)
    forced_max = int((sink + local).max()) if n_tiles else 0
    if ranked_keys is not None and n_tiles:  # the ranked keys a tile keeps unscored are forced as well
        forced_max = int((sink + local + extra).max())
    margin = dhsa_scores.rescored_slots(options.rescore_window, K, forced_max) if options.token_rescore else 0
    key_index = torch.empty(B, Hkv, n_tiles, K, dtype=torch.long, device=device)
    group = max(1, min(n_tiles, dhsa_scores.SCORE_ELEMENTS // max(1, heads * Lk)))
    for b in range(B):
        ends = boundaries[b]
        keys = k[b].float().mean(0, keepdim=True) if share_heads else k[b]
        kept = None
        bound = options.chunk_score == "bound"
        if decode_cache is not None and Lq == 1 and not share_heads and not k.is_cuda and not bound:
            entry = decode_cache["chunks"].get(b)
            if entry is None or not entry.fits(keys, robust, expand):
                entry = DecodeChunks(keys, decode_cache["prompt_ends"][b], decode_cache["prompt_len"], robust, expand)
                decode_cache["chunks"][b] = entry
            kept = entry.step(keys, ends, options.center_keys)
        if kept is not None:  # the chunk vectors kept from the last step, extended by the new keys
            chunk_k, centring = kept
            if query_pooling != "max" and expand > 1:  # the other poolings score chunk vectors per query head
                chunk_k = chunk_k.repeat_interleave(expand, 0)
                if centring is not None:
                    centring = (centring[0].repeat_interleave(expand, 0), centring[1])
        elif bound:  # per-chunk key max / min, scored by [q+, q-] (dhsa_scores.bound_chunk_keys)
            chunk_k = dhsa_scores.bound_chunk_keys(keys, ends)  # [heads, Nc, 2D]
            centring = dhsa_scores.bound_centring(keys, ends, tile_end) if options.center_keys else None
            if expand > 1:
                chunk_k = chunk_k.repeat_interleave(expand, 0)
                if centring is not None:
                    centring = (centring[0].repeat_interleave(expand, 0), centring[1])
        else:
            chunk_k = chunk_vectors(keys, ends, robust)  # [heads, Nc, D]
            if expand > 1:  # the same numbers as chunk vectors of repeated keys, for 1/expand of the prefix sums
                chunk_k = chunk_k.repeat_interleave(expand, 0)
            centring = tile_key_means(chunk_k, ends, tile_end, robust) if options.center_keys else None
        # token rescoring reads the keys of selecting head h at keys[h // expand] (no copy per query head)
        if query_pooling == "mean":
            vec = q_vec[b] if head_pooling == "max" else q_vec[b][:, None]  # [heads, G or 1, n_tiles, D]
            if bound:
                vec = dhsa_scores.bound_queries(vec)
            chunk_scores = torch.einsum("hgtd,hcd->hgtc", vec, chunk_k)
            if centring is not None:
                shift = (vec * centring[0][:, None]).sum(-1)  # [heads, G or 1, n_tiles]
                chunk_scores = chunk_scores - shift[..., None] * centring[1]
            chunk_scores = chunk_scores.amax(1)  # S_c: [heads, n_tiles, Nc]
        elif query_pooling.startswith("softmax_"):  # per-query chunk probabilities, pooled over the tile
            chunk_scores = dhsa_scores.softmax_pooled_chunk_scores(
                q[b], keys.repeat_interleave(expand, 0) if expand > 1 else keys, ends, T,
                query_pooling.removeprefix("softmax_"), head_pooling, q_offset)
        elif kept is not None and Hq == chunk_k.shape[0] * expand:  # a decode step, one selection per query head:
            # the heads of a KV head scored in one product (DecodeChunks.scores)
            chunk_scores = entry.scores(q[b], chunk_k, centring)
        else:
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            q_b = dhsa_scores.bound_queries(q[b]) if bound else q[b]
            chunk_scores = max_pooled_chunk_scores(q_b, chunk_k, T, head_pooling, centring, starts, tile_end)
        chunk_of_key = None
        tile_ranges = _tile_groups(n_tiles, group, first_exact)
        while tile_ranges:
            t0, t1 = tile_ranges.pop(0)
            width = Lk if t0 >= first_exact else width_other
            end, s, l = tile_end[t0:t1, None], sink[t0:t1, None], local[t0:t1, None]

            def ranked(width: int, best_first: bool = False):
                """The tiles' top-`width` keys by chunk score: (top, idx) [heads, g, width], top +inf for forced
                keys, -inf for slots the tile cannot fill; `plain` if they came sorted from whole chunks.
                best_first: at the token level, best first (so that every prefix is a top-k too)."""
                nonlocal chunk_of_key
                picked = None
                if (width == K or width < Lk) and ranked_keys is None and _CHUNK_TOPK and not best_first:
                    picked = _chunk_topk(chunk_scores[:, t0:t1], ends, tile_end[t0:t1],
                                         torch.clamp(tile_end[t0:t1], max=width), sink[t0:t1], local[t0:t1], width)
                if picked is not None:  # its chunk scores only mark forced and unused slots
                    forced = (picked >= 0) & ((picked < s) | (picked >= end - l))
                    return torch.where(forced, float("inf"), 0.0).masked_fill_(picked < 0, float("-inf")), picked, True
                if chunk_of_key is None:
                    chunk_of_key = torch.searchsorted(ends, key_pos, right=True)  # key j lies in chunk chunk_of_key[j]
                part = chunk_scores[:, t0:t1]  # upsample to tokens: [heads, g, Lk] (gather: 9x index_select on CPU)
                scores = torch.gather(part, 2, chunk_of_key.expand(part.shape[0], part.shape[1], Lk))
                visible = key_pos[None, :] < end
                forced = visible & ((key_pos[None, :] < s) | (key_pos[None, :] >= end - l))
                if ranked_keys is not None:
                    forced = forced | _first_ranked(ranked_keys[b], end, s, l, extra[t0:t1, None], Lk)  # [heads, g, Lk]
                scores = scores.masked_fill_(forced, float("inf")).masked_fill_(~visible, float("-inf"))
                top, idx = torch.topk(scores, width, dim=-1, sorted=best_first)
                return top, idx, False

            if width > K and margin:  # the best keys by chunk score as today, the last `margin` slots rescored
                keep_width = K - margin
                band_width = min(Lk, keep_width + math.ceil(options.token_rescore * margin))
                split = None
                if ranked_keys is None and _CHUNK_TOPK:  # one ranking of whole chunks, cut twice
                    split = _whole_chunk_split(chunk_scores[:, t0:t1], ends, tile_end[t0:t1], sink[t0:t1],
                                               local[t0:t1], keep_width, band_width)
                if split is _TIED and t1 - t0 > _TIED_GROUP:  # a tie at a cut: halve the group, so that only
                    tile_ranges[:0] = [(t0, (t0 + t1) // 2), ((t0 + t1) // 2, t1)]  # the tied tiles rank tokens
                    continue
                if split is not None and split is not _TIED:
                    keep_idx, band = split
                else:  # one token-level ranking, best first: its first keep_width keys kept, the rest the band
                    top, idx, _ = ranked(band_width, best_first=True)
                    keep_idx = torch.where(top[..., :keep_width] == float("-inf"), -1, idx[..., :keep_width])
                    band = torch.where(top[..., keep_width:] > float("-inf"), idx[..., keep_width:], -1)
                top, idx = _rescore_band(q[b], keys, keep_idx, band, t0, T, q_offset, margin, options.rescore_queries,
                                         expand)
            else:
                top, idx, plain = ranked(width)
                if plain and width == K:  # plain top-N_b
                    key_index[b, :, t0:t1] = idx
                    continue
                if width > K:  # hierarchical refinement: keep the N_b best of the candidates, key by key
                    top, idx = _rescore_tokens(q[b], keys, top, idx, t0, T, q_offset, K, options.rescore_queries,
                                               expand)
            idx = torch.where(top == float("-inf"), Lk, idx)  # slots beyond what the tile can see
            idx = sorting.sort(idx.int() if Lk < 2 ** 31 else idx)  # (int32: half the time of an int64 sort)
            key_index[b, :, t0:t1] = torch.where(idx == Lk, -1, idx)  # broadcasts over heads if shared
    return Selection(key_index, T, q_offset)


def _rescore_band(q, k, keep_idx, band, t0: int, T: int, q_offset: int, margin: int, sample: int, expand: int):
    """rescore_window: the tiles keep `keep_idx` (their best keys by chunk score, forced ones included; -1 pads) and
    fill `margin` more slots with the best keys of `band` ([heads, g, W], the next keys by chunk score; -1 pads),
    rescored key by key by _rescore_tokens over the band alone. Returns (top, idx) [heads, g, keep + margin], +inf
    for the kept keys, -inf for unused slots."""
    band_top = torch.where(band >= 0, 0.0, float("-inf"))
    best, best_idx = _rescore_tokens(q, k, band_top, band, t0, T, q_offset, min(margin, band.shape[-1]), sample,
                                     expand)
    keep_top = torch.where(keep_idx >= 0, float("inf"), float("-inf"))
    return torch.cat([keep_top, best], dim=-1), torch.cat([keep_idx.clamp(min=0), best_idx], dim=-1)


def _first_ranked(ranked: torch.Tensor, end: torch.Tensor, sink: torch.Tensor, local: torch.Tensor,
                  extra: torch.Tensor, Lk: int) -> torch.Tensor:
    """[heads, g, Lk] bool: per tile, the first `extra` keys of `ranked` ([heads, M], best first, -1 pads) that
    the tile sees and does not keep anyway (sinks, local window). end, sink, local, extra: [g, 1] per tile."""
    r = ranked[:, None, :]  # [heads, 1, M]
    usable = (r >= sink) & (r >= 0) & (r < end - local)  # [heads, g, M]; -1 pads never usable
    take = usable & (usable.cumsum(-1) <= extra)
    out = torch.zeros(ranked.shape[0], end.shape[0], Lk + 1, dtype=torch.bool, device=ranked.device)
    out.scatter_(-1, torch.where(take, r, Lk), True)
    return out[..., :Lk]


class DecodeChunks:
    """Chunk vectors of one sequence's decode steps, kept from step to step (the CPU path of a decode step).

    Algorithm 2's chunks (dhsa_scores.decode_boundaries) are the prompt's, then the tokens generated so far, then
    the current token. The prompt's chunk vectors are computed once (repeated per selecting head once, into a
    buffer whose last two rows each step rewrites). For the two last chunks the fp32 prefix sums are extended
    key by key exactly as dhsa_scores.prefix_sums computes them (a float64 running sum inside each slice of
    _PREFIX_SLICE keys, as the CPU cumsum accumulates, plus the fp32 carry of the slices before), and the centring
    (tile_key_means of the step's one tile) keeps its float64 running sum over the prompt's chunk sums. A step
    then costs O(new keys + chunks), not a pass over the whole cache, and gives the same numbers as recomputing
    (tests/test_cpu_fast_paths.py), so the same kept keys. The vectors are kept once per KV head: `scores` gives
    the `expand` query heads of a KV head their chunk scores in one product, reading the chunk vectors once.

    keys: [H, Lk, D] (KV heads); prompt_ends: the prompt's chunk ends (last = prompt_len); expand: query heads per
    KV head that select alone."""

    def __init__(self, keys: torch.Tensor, prompt_ends: torch.Tensor, prompt_len: int, robust: bool, expand: int):
        H, _, D = keys.shape
        self.prompt_len, self.robust, self.expand, self.dtype = prompt_len, robust, expand, keys.dtype
        self.prompt_ends = prompt_ends[prompt_ends <= prompt_len]
        vec = chunk_vectors(keys[:, :prompt_len], self.prompt_ends, robust)  # [H, Ncp, D]
        Ncp = vec.shape[1]
        lengths = torch.diff(self.prompt_ends, prepend=self.prompt_ends.new_zeros(1)).to(torch.float32)
        sums = vec / (lengths.rsqrt() if robust else lengths.reciprocal())[None, :, None]  # as tile_key_means
        self.sum0 = sums[:, 0]
        self.chunk_sum = torch.cumsum(sums.transpose(1, 2).double(), dim=-1)[..., -1]  # float64 [H, D]
        # stored transposed, [KV heads, D, chunks]: a step's queries score it as [expand, D] x [D, chunks], which
        # the CPU's GEMM runs several times faster than chunks x D against one column (max_pooled_chunk_scores)
        self.buffer = torch.empty(H, D, Ncp + 2, dtype=torch.float32, device=keys.device)
        self.buffer[:, :, :Ncp] = vec.transpose(1, 2)
        self.weight = torch.empty(Ncp + 2, dtype=torch.float32, device=keys.device)  # the centring's chunk weights
        self.weight[:Ncp] = lengths.sqrt() if robust else 1.0
        positions = torch.tensor([0, prompt_len], device=keys.device)
        self.p_prompt = dhsa_scores.prefix_sums(keys[:, :prompt_len], positions)[:, 1]  # P[prompt_len]
        n, size = prompt_len, dhsa_scores._PREFIX_SLICE
        self.start = (n - 1) // size * size if n > 0 else 0  # the slice that P[n] comes from
        self.carry = dhsa_scores.prefix_sums(keys[:, :self.start], positions.new_tensor([0, self.start]))[:, 1] \
            if self.start else torch.zeros(H, D, dtype=torch.float32, device=keys.device)
        self.acc = torch.cumsum(keys[:, self.start:n], dim=1, dtype=torch.float64)[:, -1] if n > self.start \
            else torch.zeros(H, D, dtype=torch.float64, device=keys.device)
        self.n = n  # keys 0 .. n-1 are in the running sums

    def fits(self, keys: torch.Tensor, robust: bool, expand: int) -> bool:
        return (robust, expand, keys.dtype, keys.shape[0]) == (self.robust, self.expand, self.dtype,
                                                              self.buffer.shape[0]) \
            and keys.shape[1] > max(self.n, self.prompt_len)

    def _prefix(self, acc, carry, start, n):
        return carry if n == start else acc.float() + carry  # P[n], as prefix_sums' running + carry

    def _advance(self, keys: torch.Tensor, upto: int, commit: bool = True):
        """Running sums over keys self.n .. upto-1 (float64 adds in key order, a new slice every _PREFIX_SLICE
        keys); returns P[upto]; commit=False leaves the state as it was."""
        acc, carry, start, n, size = self.acc, self.carry, self.start, self.n, dhsa_scores._PREFIX_SLICE
        while n < upto:
            if n == start + size:  # the next slice starts from the fp32 prefix at its first key
                carry, start, acc = self._prefix(acc, carry, start, n), n, torch.zeros_like(acc)
            e = min(upto, start + size)
            acc = torch.cumsum(torch.cat([acc[:, None], keys[:, n:e].double()], dim=1), dim=1)[:, -1]
            n = e
        if commit:
            self.acc, self.carry, self.start, self.n = acc, carry, start, n
        return self._prefix(acc, carry, start, n)

    def step(self, keys: torch.Tensor, ends: torch.Tensor, center: bool):
        """(chunk_k [H, Nc, D] per KV head, centring (key_mean [H, 1, D], weight [Nc]) or None) for a decode step
        with `ends`, as chunk_vectors and tile_key_means (before repeating per query head); None if ends are not
        this prompt's decode chunks (the caller then recomputes)."""
        Lk, Ncp = keys.shape[1], self.prompt_ends.numel()
        first = Lk - 1 == self.prompt_len  # the first step: the current token is the only new chunk
        tail = [Lk] if first else [Lk - 1, Lk]
        if ends.numel() != Ncp + len(tail) or ends[Ncp:].tolist() != tail:
            return None
        prefix = [self.p_prompt]
        if not first:
            prefix.append(self._advance(keys, Lk - 1))
        prefix.append(self._advance(keys, Lk, commit=False))  # the current token: not kept (a step may repeat)
        prefix = torch.stack(prefix, dim=1)  # [H, 2 or 3, D]
        positions = torch.tensor([self.prompt_len] + tail, device=keys.device)
        lengths = (positions[1:] - positions[:-1]).to(torch.float32)
        weight = lengths.rsqrt() if self.robust else lengths.reciprocal()
        vec = (prefix[:, 1:] - prefix[:, :-1]) * weight[None, :, None]  # [H, 1 or 2, D], as chunk_vectors
        # the new chunks into the buffer's last columns, in place (no copy of the prompt's chunks)
        self.buffer[:, :, Ncp: Ncp + vec.shape[1]] = vec.transpose(1, 2)
        chunk_k = self.buffer[:, :, : Ncp + vec.shape[1]].transpose(1, 2)  # [H, Nc, D], a transposed view
        if not center:
            return chunk_k, None
        sums = vec / weight[None, :, None]  # tile_key_means' key sums of the new chunks
        acc = self.chunk_sum
        for i in range(sums.shape[1]):
            acc = acc + sums[:, i].double()
        key_sum = acc.float() - self.sum0  # its prefix over every chunk minus chunk 0
        count = torch.tensor(float(Lk - int(ends[0])), device=keys.device)
        key_mean = torch.where(count > 0, key_sum / count.clamp(min=1), 0.0)
        self.weight[Ncp: Ncp + vec.shape[1]] = lengths.sqrt() if self.robust else 1.0
        return chunk_k, (key_mean[:, None], self.weight[: Ncp + vec.shape[1]])

    def scores(self, q: torch.Tensor, chunk_k: torch.Tensor, centring) -> torch.Tensor:
        """S_c of a decode step's query q [Hq, 1, D] (Hq = H * expand) from `step`'s chunk_k and centring:
        [Hq, 1, Nc], what max_pooled_chunk_scores gives on the chunk vectors repeated per query head."""
        H, Nc, D = chunk_k.shape
        rows = q.reshape(H, self.expand, D).float()
        scores = torch.bmm(rows, chunk_k.transpose(1, 2))  # [H, expand, Nc]
        if centring is not None:
            key_mean, weight = centring
            shift = (rows * key_mean).sum(-1)  # q . m per query head: [H, expand]
            scores = scores - weight * shift[..., None]
        return scores.view(H * self.expand, 1, Nc)


_CHUNK_TOPK = True  # False: every tile on the token-level top-k (tests compare the two)


def _chunk_topk(chunk_scores: torch.Tensor, ends: torch.Tensor, tile_end: torch.Tensor, tile_budget: torch.Tensor,
                sink: torch.Tensor, local: torch.Tensor, K: int) -> torch.Tensor | None:
    """The token-level top-N_b of a group of tiles, computed over chunks; None where that is not provably the same.

    The token path gives every key its chunk's score (+inf for the sinks and the local window, -inf for keys a
    tile cannot see) and keeps the top K. A tile that sees at most its budget keeps every visible key. Any other
    tile keeps its sinks [0, s), its local window [end - l, end) and the best chunks of the keys in between, a
    chunk counting the keys it has there: when the best chunks hold exactly K - s - l such keys and the next
    chunk scores strictly less, that set is the unique top K of the token scores, so it is what torch.topk keeps
    whatever its tie-breaking. If one tile of the group ends inside a chunk or ties at the cut (or a score is
    NaN), this returns None and the caller runs the token-level top-k. Uniform chunks with sinks, local window and
    budget in whole chunks (the defaults at L = multiples of 256) are always exact; most learned boundaries are not.

    chunk_scores: [H, g, Nc] (S_c, -inf for chunks a tile cannot see); ends: [Nc]; tile_end, tile_budget, sink,
    local: [g]. Returns [H, g, K] sorted key lists, -1 for unused slots.
    """
    H, g, Nc = chunk_scores.shape
    device = chunk_scores.device
    slot = torch.arange(K, device=device)
    out = torch.where(slot[None, :] < tile_end[:, None], slot[None, :], -1).expand(H, g, K).clone()  # sees <= K keys
    part = tile_end > tile_budget  # tiles that choose; their budget is K, so sinks, window and need are shared
    if not bool(part.any()):
        return out
    between = _keys_between_forced(part, ends, tile_end, sink, local)
    if between is None:
        return None
    rows, end, s, l, lo, count = between
    need = K - s - l  # keys chosen by the chunk scores, between the sinks and the local window
    biggest = int(count.max())
    if need <= 0 or biggest == 0:
        return None
    kc = min(Nc, -(-need // biggest) + 1)  # enough chunks for `need` keys if they are whole, and one more
    scores = chunk_scores[:, rows].masked_fill(count[None] == 0, float("-inf"))
    if need % biggest == 0 and kc == need // biggest + 1 and bool(((count == 0) | (count == biggest)).all()):
        return _whole_chunk_topk(out, scores, rows, lo, biggest, need // biggest, slot[:s], end, l)
    top, top_chunk = sorting.topk(scores, kc, best_first=True)  # [H, r, kc]
    if bool(torch.isnan(top[..., 0]).any()):  # NaN ranks first in topk; let the token path decide
        return None
    counts = count[None].expand(H, -1, -1).gather(-1, top_chunk)
    cum = counts.cumsum(-1)
    cut = (cum < need).sum(-1, keepdim=True)  # index of the chunk that reaches `need`
    if bool((cut >= kc - 1).any()):
        return None  # not reached within kc - 1 chunks (no chunk left to compare with)
    exact = cum.gather(-1, cut) == need
    strict = top.gather(-1, cut) > top.gather(-1, cut + 1)
    if not bool((exact & strict).all()):
        return None
    chosen = sorting.sort(torch.where(torch.arange(kc, device=device) <= cut, top_chunk, Nc))  # in key order
    count_pad = F.pad(count, (0, 1))[None].expand(H, -1, -1)
    lo_pad = F.pad(lo, (0, 1))[None].expand(H, -1, -1)
    c = count_pad.gather(-1, chosen)
    first = c.cumsum(-1)
    pos = torch.arange(need, device=device).expand(H, rows.numel(), need).contiguous()
    j = torch.searchsorted(first, pos, right=True)  # the chosen chunk of each of the `need` slots
    keys = lo_pad.gather(-1, chosen).gather(-1, j) + pos - (first - c).gather(-1, j)
    window = end[:, None] - l + torch.arange(l, device=device)[None, :]  # [r, l]
    out[:, rows] = torch.cat([slot[:s].expand(H, rows.numel(), s), keys, window.expand(H, -1, -1)], dim=-1)
    return out


def _keys_between_forced(choose: torch.Tensor, ends: torch.Tensor, tile_end: torch.Tensor, sink: torch.Tensor,
                         local: torch.Tensor):
    """The tiles that choose (bool [g]) and, per chunk, its keys between their sinks and local window: (rows, end,
    s, l, lo, count), lo / count [r, Nc] the first such key and their number; None if the tiles' sink or local
    counts differ (the chunk-level paths need one of each)."""
    rows = choose.nonzero()[:, 0]
    end, s, l = tile_end[rows], int(sink[rows].max()), int(local[rows].max())
    if bool((sink[rows] != s).any()) or bool((local[rows] != l).any()):
        return None
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    lo = torch.clamp(starts, min=s).expand(rows.numel(), ends.numel())
    count = torch.clamp(torch.minimum(ends[None, :], end[:, None] - l) - lo, min=0)
    return rows, end, s, l, lo, count


def _chunk_keys(lo: torch.Tensor, chosen: torch.Tensor, size: int) -> torch.Tensor:
    """The keys of whole chunks: lo [H, r, >= Nc] first counted key per chunk, chosen [H, r, n] chunk ids ->
    [H, r, n * size], chunk by chunk."""
    first = lo.gather(-1, chosen)
    return (first[..., None] + torch.arange(size, device=lo.device)).flatten(-2)


def _whole_chunk_topk(out, scores, rows, lo, size: int, n: int, sinks, end, l: int):
    """_chunk_topk when every chunk between the sinks and the window has `size` keys there (or none) and n whole
    chunks fill the budget: the n best chunks by an unsorted top-(n+1), exact iff the one left out scores strictly
    below all n (then they are the unique top n). Returns `out` filled, or None (a tie at the cut, or NaN)."""
    H, r, _ = scores.shape
    top, top_chunk = sorting.topk(scores, n + 1)
    if bool(torch.isnan(top).any()):
        return None
    low, low_at = top.min(-1, keepdim=True)
    if not bool(((top == low).sum(-1) == 1).all()):  # the (n+1)-th best ties with one of the n best
        return None
    keep = torch.ones_like(top, dtype=torch.bool).scatter_(-1, low_at, False)
    chosen = sorting.sort(top_chunk[keep].view(H, r, n))  # in key order
    keys = _chunk_keys(lo[None].expand(H, -1, -1), chosen, size)
    window = end[:, None] - l + torch.arange(l, device=scores.device)[None, :]  # [r, l]
    out[:, rows] = torch.cat([sinks.expand(H, r, sinks.numel()), keys, window.expand(H, -1, -1)], dim=-1)
    return out


_TIED = "tied"  # _whole_chunk_split: chunk scores tie at a cut (the caller ranks tokens, in smaller groups)
_TIED_GROUP = 4  # tiles: a tied group larger than this is halved, and only the halves that tie rank tokens


def _whole_chunk_split(chunk_scores: torch.Tensor, ends: torch.Tensor, tile_end: torch.Tensor, sink: torch.Tensor,
                       local: torch.Tensor, keep: int, wide: int):
    """rescore_window's two rankings from one: per tile the top-`keep` keys by chunk score (as _chunk_topk at
    budget `keep`) and the band, the keys the top-`wide` adds to them, in ascending key order with -1 pads
    ([H, g, keep], [H, g, wide - keep]). Only where every chunk between the sinks and the window is whole there
    (one size) and both cuts fall between whole chunks that score strictly apart, so that both sets are the unique
    token-level top-k; otherwise None (the caller ranks the tokens), or _TIED where only a tie at a cut stands in
    the way. sink, local: [g], of the final budget."""
    H, g, Nc = chunk_scores.shape
    device = chunk_scores.device
    slot = torch.arange(keep, device=device)
    keep_out = torch.where(slot[None, :] < tile_end[:, None], slot[None, :], -1).expand(H, g, keep).clone()
    band_out = torch.full((H, g, wide - keep), -1, dtype=torch.long, device=device)
    choose = tile_end > keep  # tiles that choose their kept keys; the others keep all, no band
    if not bool(choose.any()):
        return keep_out, band_out
    between = _keys_between_forced(choose, ends, tile_end, sink, local)
    if between is None:
        return None
    rows, end, s, l, lo, count = between
    size = int(count.max())
    need_keep, need_wide = keep - s - l, wide - s - l
    if size == 0 or need_keep < 0 or need_wide <= 0 or need_keep % size or need_wide % size \
            or not bool(((count == 0) | (count == size)).all()):
        return None  # (need_keep == 0: the forced keys fill all but the margin, as at 8K with the defaults)
    n_keep, n_wide = need_keep // size, min(Nc, need_wide // size)
    scores = chunk_scores[:, rows].masked_fill(count[None] == 0, float("-inf"))
    top, top_chunk = sorting.topk(scores, min(Nc, n_wide + 1), best_first=True)  # [H, r, n_wide + 1]
    if bool(torch.isnan(top).any()) or top.shape[-1] <= n_keep:
        return None
    if n_keep and not bool((top[..., n_keep - 1] > top[..., n_keep]).all()):  # a tie at the kept keys' cut
        return _TIED
    if n_wide < top.shape[-1]:  # a tie at the band's cut matters only if the chunk after it is visible
        after = top[..., n_wide]
        if not bool(((top[..., n_wide - 1] > after) | (after == float("-inf"))).all()):
            return _TIED
    lo_pad = F.pad(lo, (0, 1), value=-1 - size)[None].expand(H, -1, -1)  # chunk Nc ("none"): keys -1-size .. -2

    def keys_of(taken: torch.Tensor) -> torch.Tensor:  # chunks (Nc = none), sorted, as their keys in key order
        return _chunk_keys(lo_pad, sorting.sort(taken), size).clamp_(min=-1)

    window = end[:, None] - l + torch.arange(l, device=device)[None, :]  # [r, l]
    keep_out[:, rows] = torch.cat([slot[:s].expand(H, rows.numel(), s), keys_of(top_chunk[..., :n_keep]),
                                   window.expand(H, -1, -1)], dim=-1)
    band_chunks = top_chunk[..., n_keep:n_wide]
    band_chunks = torch.where(top[..., n_keep:n_wide] > float("-inf"), band_chunks, Nc)
    band_out[:, rows, : band_chunks.shape[-1] * size] = keys_of(band_chunks)
    return keep_out, band_out


def _tile_groups(n_tiles: int, size: int, split: int):
    """(t0, t1) ranges of at most `size` tiles covering 0 .. n_tiles, none straddling tile `split`."""
    cuts = sorted({0, n_tiles, min(max(split, 0), n_tiles)})
    return [(t0, min(hi, t0 + size)) for lo, hi in zip(cuts, cuts[1:]) for t0 in range(lo, hi, size)]


_CPU_GATHER_ELEMENTS = 1 << 22  # CPU token rescoring: candidate keys gathered per slice of tiles (16 MB fp32)


def _rescore_tokens(q: torch.Tensor, k: torch.Tensor, top: torch.Tensor, idx: torch.Tensor, t0: int, T: int,
                    q_offset: int, K: int, sample: int = 0, expand: int = 1):
    """Token-level refinement of the chunk-ranked candidates of a group of query tiles.

    q: [Hq, Lq, D], k: [H / expand, Lk, D] (one sequence; H heads select, G = Hq / H query heads share a selection;
    selecting head h reads keys k[h // expand]: expand > 1 when every query head selects alone); top, idx: [H, g, W]
    candidate keys of tiles t0 .. t0+g-1 with their chunk scores (+inf forced, -inf not visible). Every candidate
    gets the largest attention weight that any query (and any head of its group) of the tile gives it in a softmax
    over the tile's candidates, causally; forced keys stay forced. Returns the K best (top, idx) per tile.
    sample: if 0 < sample < T, only `sample` queries per tile rescore, evenly spaced back from its last query.
    Cost: T (or sample) x W dot products per tile and head, done a few tiles at a time.
    """
    H, g, W = idx.shape
    Hq, Lq, D = q.shape
    Lk = k.shape[1]
    G = Hq // H
    key_row = torch.arange(H, device=k.device)[:, None, None] // expand * Lk  # first row of head h's keys
    key_rows = k.reshape(-1, D)  # once per call (a copy only if k is not contiguous)
    best = torch.empty(H, g, K, dtype=top.dtype, device=top.device)
    best_idx = torch.empty(H, g, K, dtype=idx.dtype, device=idx.device)
    elements = dhsa_scores.SCORE_ELEMENTS * (4 if q.is_cuda else 1)  # logits held at once (GPUs have room)
    R = sample if 0 < sample < T else T  # rescoring queries per tile
    if Lq == 1 and R < T:  # a decode step: its one query, not R copies of it (the same maximum)
        R = 1
    step = max(1, elements // max(1, Hq * R * W))  # tiles per slice
    if not q.is_cuda:  # the CPU gathers a few MB of keys at a time: they stay in cache until the product reads them
        step = max(1, min(step, _CPU_GATHER_ELEMENTS // max(1, H * W * D)))
    # one buffer for the gathered keys and one for the logits, reused by every slice: a fresh allocation of this
    # size per slice is a fresh mmap on the CPU, and its page faults cost more than the copy
    key_buf = torch.empty(H * min(step, g) * W * D, dtype=k.dtype, device=k.device)
    logit_buf = torch.empty(H * min(step, g) * G * R * W, dtype=torch.float32, device=k.device)
    forced = torch.isinf(top)  # +inf forced, -inf unused or invisible: these keep their score
    unused = top == float("-inf")
    if R < T:  # every (T // R)-th query back from each tile's last one, within the tile (a short tile repeats)
        tile_first = (t0 + torch.arange(g, device=q.device)[:, None]) * T
        tile_last = torch.clamp(tile_first + T, max=Lq) - 1
        picked = torch.maximum(tile_last - torch.arange(R, device=q.device) * (T // R), tile_first)  # [g, R]
        # the rows of one (head, tile) together, scaled here (G*R rows) rather than their logits (G*R*W)
        sampled = q[:, picked.reshape(-1)].view(H, G, g, R, D).transpose(1, 2).float() * D ** -0.5
        # tiles whose every candidate precedes every rescoring query (a margin's band) need no causal mask
        before = (idx.amax(-1) < (q_offset + picked).amin(-1)).all(0).tolist()  # [g]
    for s0 in range(0, g, step):
        s1 = min(g, s0 + step)
        n = s1 - s0
        if R < T:
            rows = sampled[:, s0:s1].reshape(H * n, G * R, D)
            query_pos = q_offset + picked[s0:s1]
            causal = not all(before[s0:s1])
        else:
            first, last = (t0 + s0) * T, min(Lq, (t0 + s1) * T)  # query rows of these tiles
            rows = F.pad(q[:, first:last], (0, 0, 0, n * T - (last - first)))  # [Hq, n*T, D], padded rows = 0
            rows = rows.view(H, G, n, T, D).transpose(1, 2).reshape(H * n, G * R, D).float() * D ** -0.5
            query_pos = q_offset + first + torch.arange(n * T, device=q.device).view(n, T)
            causal = True  # (and padded rows)
        cand = idx[:, s0:s1]  # [H, n, W]
        # the candidates' keys: rows of the flattened keys (index_select copies whole rows; gather with an index
        # expanded over D is several times slower on the CPU)
        flat = (cand.clamp(min=0) + key_row).reshape(-1)
        keys = torch.index_select(key_rows, 0, flat, out=key_buf[: flat.numel() * D].view(-1, D))
        keys = keys.view(H * n, W, D).float()
        logits = torch.bmm(rows, keys.transpose(1, 2), out=logit_buf[: H * n * G * R * W].view(H * n, G * R, W))
        logits = logits.view(H, n, G, R, W)
        if causal:  # a candidate at or after a query of its tile, or padded rows
            blocked = (cand[:, :, None, None, :] > query_pos[None, :, None, :, None]) \
                | unused[:, s0:s1, None, None, :]
            if R == T:
                blocked |= (query_pos >= q_offset + Lq)[None, :, None, :, None]  # padded rows
            logits.masked_fill_(blocked, float("-inf"))
        elif bool(unused[:, s0:s1].any()):  # every candidate precedes every query: only the unused slots
            logits.masked_fill_(unused[:, s0:s1, None, None, :], float("-inf"))
        # log of the best softmax weight, [H, n, W]; a row that sees no candidate (NaN) gives none
        weight = torch.log_softmax(logits, dim=-1).nan_to_num_(nan=float("-inf")).amax(dim=(2, 3))
        weight = torch.where(forced[:, s0:s1], top[:, s0:s1], weight)  # forced and invisible keys
        best[:, s0:s1], pick = sorting.topk(weight, K)
        best_idx[:, s0:s1] = torch.gather(cand, -1, pick)
    return best, best_idx


def tail_key_ranking(q_tail: torch.Tensor, k: torch.Tensor, num: int, heads: int,
                     scale: float | None = None) -> torch.Tensor:
    """Keys ranked by the attention the last queries of a prefill give them (the question's keys, as SnapKV's
    observation window): softmax over every visible key, summed over those queries and over the query heads that
    share a selection head. q_tail: [B, Hq, n, D] at positions Lk - n .. Lk - 1; k: [B, Hkv, Lk, D]; heads: the
    selection heads (Hq, Hkv or 1). Returns [B, heads, min(num, Lk)] int64, best first."""
    B, Hq, n, D = q_tail.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    future = torch.arange(Lk, device=k.device)[None, :] > (Lk - n + torch.arange(n, device=k.device))[:, None]
    mass = torch.empty(B, Hq, Lk, dtype=torch.float32, device=k.device)
    for h in range(Hkv):  # one KV head's query group at a time: [B, G, n, Lk] logits
        logits = torch.matmul(q_tail[:, h * G:(h + 1) * G].float(), k[:, h:h + 1].float().transpose(-1, -2)) * scale
        mass[:, h * G:(h + 1) * G] = torch.softmax(logits.masked_fill(future, float("-inf")), -1).sum(2)
    mass = mass.view(B, heads, Hq // heads, Lk).sum(2)
    return torch.topk(mass, min(num, Lk), dim=-1).indices


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
    config = SparseAttentionConfig(method="dhsa", budget=budget, density=density, query_chunk=query_chunk, **options)
    Lk = k.shape[2]
    if boundaries is None:
        ends = FixedSizeBoundaries.from_config(config)(k, config.num_chunks(Lk))
    else:
        ends = as_boundary_list(boundaries, k.shape[0], Lk, device=k.device)
    selection = dhsa_select(q, k, budget=config.resolve_budget(Lk), boundaries=ends, options=config.dhsa_options())
    return sparse_attention(q, k, v, selection, scale=scale, softcap=softcap)


__all__ = ["dhsa_attention", "dhsa_select", "tail_key_ranking"]
