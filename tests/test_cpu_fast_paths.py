"""The CPU speed-ups of the PyTorch paths change no result: the selection keeps exactly the keys of the plain
computation (every chunk scored, keys repeated per query head; the visible chunk scores are the same dot products,
at most an ulp apart where BLAS rounds a narrower matrix differently), and the split executor (unmasked prefix + masked
suffix, merged by log-sum-exp) equals the fully masked attention."""

import pytest
import torch

import utils.attention as attention
import utils.methods.dhsa.select as dhsa
from utils.attention import dense_attention, sparse_attention
from utils.config import SparseAttentionConfig
from utils.methods.dhsa.select import dhsa_select
from utils.methods.dhsa.scores import chunk_vectors, max_pooled_chunk_scores, tile_key_means
from utils.selection import Selection, full_selection


def random_ends(L: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Variable-length chunks: n random cuts, last end L."""
    cuts = torch.randint(1, L, (n,), generator=g)
    return torch.unique(torch.cat([cuts, torch.tensor([L])]))


def plain_chunk_scores(q, chunk_k, query_chunk, head_pooling="mean", centring=None, chunk_starts=None,
                       tile_end=None):
    """max_pooled_chunk_scores as before the CPU work: every chunk scored for every tile."""
    return max_pooled_chunk_scores(q, chunk_k, query_chunk, head_pooling, centring)


def test_causal_chunk_scores_are_the_same_numbers():
    g = torch.Generator().manual_seed(0)
    L, T = 1000, 64
    q, k = torch.randn(6, L, 32, generator=g), torch.randn(2, L, 32, generator=g)
    ends = random_ends(L, 70, g)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    n_tiles = -(-L // T)
    tile_end = torch.clamp(torch.arange(1, n_tiles + 1) * T, max=L)
    chunk_k = chunk_vectors(k, ends)
    centring = tile_key_means(chunk_k, ends, tile_end)
    for pooling in ("mean", "max"):
        full = max_pooled_chunk_scores(q, chunk_k, T, pooling, centring)
        causal = max_pooled_chunk_scores(q, chunk_k, T, pooling, centring, starts, tile_end)
        seen = starts[None, None, :] < tile_end[None, :, None]  # chunks a tile can see
        # the same dot products; BLAS may round a few of a narrower matrix 1 ulp apart (edge kernels)
        torch.testing.assert_close(causal[seen.expand_as(causal)], full[seen.expand_as(full)], rtol=1e-6, atol=1e-5)
        assert torch.isneginf(causal[~seen.expand_as(causal)]).all()


CASES = [  # L, Hq, Hkv, extra options
    (2048, 8, 2, {}),                                   # the default: one selection per query head
    (1500, 8, 2, {}),                                   # L not a multiple of the tile
    (1024, 6, 2, dict(head_pooling="max")),
    (1100, 6, 2, dict(head_pooling="mean")),
    (1024, 4, 4, {}),
    (1024, 8, 2, dict(token_rescore=4, exact_tail=128)),
    (2048, 8, 2, dict(token_rescore=2, rescore_queries=8)),
    (1500, 8, 2, dict(token_rescore=2)),
    (1024, 8, 2, dict(query_pooling="mean")),
    (1024, 8, 2, dict(share_heads=True)),
]


@pytest.mark.parametrize("L,Hq,Hkv,extra", CASES)
@pytest.mark.parametrize("learned", [False, True])
def test_selection_keeps_exactly_the_same_keys(monkeypatch, L, Hq, Hkv, extra, learned):
    g = torch.Generator().manual_seed(L + Hq)
    q, k = torch.randn(1, Hq, L, 64, generator=g), torch.randn(1, Hkv, L, 64, generator=g)
    config = SparseAttentionConfig(method="dhsa", density=0.0625, **extra)
    ends = random_ends(L, L // 16, g) if learned else torch.arange(16, L + 16, 16).clamp(max=L).unique()
    budget, options = config.resolve_budget(L), config.dhsa_options()
    fast = dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index
    # Before: keys repeated per query head (one selection per head), every chunk scored for every tile.
    monkeypatch.setattr(dhsa, "max_pooled_chunk_scores", plain_chunk_scores)
    per_head = options.head_pooling == "none" and not options.share_heads
    k_before = k.repeat_interleave(Hq // Hkv, dim=1) if per_head else k
    plain = dhsa_select(q, k_before, budget=budget, boundaries=[ends], options=options).key_index
    assert torch.equal(fast, plain)


def masked_attention(q, k, v, selection):
    """sparse_attention with the fully masked executor (the path before the split)."""
    saved = attention._flash_with_lse
    attention._flash_with_lse = None
    try:
        return sparse_attention(q, k, v, selection)
    finally:
        attention._flash_with_lse = saved


@pytest.mark.skipif(attention._flash_with_lse is None, reason="this torch has no CPU flash kernel with its LSE")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_executor_equals_masked_attention(dtype):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, L, D = 2, 8, 2, 1200, 64
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # DHSA's sorted key lists (unused slots -1 at the end, early tiles with fewer keys than the budget)
    config = SparseAttentionConfig(method="dhsa", budget=256)
    ends = torch.arange(16, L + 16, 16).clamp(max=L).unique()
    sel = dhsa_select(q, k, budget=256, boundaries=[ends] * B, options=config.dhsa_options())
    torch.testing.assert_close(sparse_attention(q, k, v, sel), masked_attention(q, k, v, sel), atol=tol, rtol=tol)
    # unsorted random lists with holes, and one tile whose first rows read nothing
    n_tiles = -(-L // 64)
    idx = torch.randint(0, L, (B, Hkv, n_tiles, 200), generator=g)
    idx[..., ::7] = -1
    idx[0, 0, 3] = 3 * 64 + 40  # rows 0..39 of tile 3 see no key
    sel = Selection(idx, 64, 0)
    out = sparse_attention(q, k, v, sel)
    torch.testing.assert_close(out, masked_attention(q, k, v, sel), atol=tol, rtol=tol)
    assert (out[0, :4, 3 * 64: 3 * 64 + 40] == 0).all()
    # every key selected: dense attention
    full = full_selection(B, Hkv, L, L, 64)
    torch.testing.assert_close(sparse_attention(q, k, v, full), dense_attention(q, k, v), atol=tol, rtol=tol)


@pytest.mark.skipif(attention._flash_with_lse is None, reason="this torch has no CPU flash kernel with its LSE")
@pytest.mark.parametrize("head_pooling", ["none", "mean"])
def test_shared_mask_executor_equals_masked_attention(monkeypatch, head_pooling):
    """Runs of full DHSA tiles (one key pattern across heads, Hs = Hq or stacked GQA rows) run as one call with a
    broadcast mask; early tiles (fewer keys than the budget) get their own. Both equal the fully masked attention,
    and the tiles took fewer calls than there are tiles."""
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, L, D = 1, 6, 2, 2048, 64
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    config = SparseAttentionConfig(method="dhsa", budget=320, head_pooling=head_pooling, dense_tail=0)
    ends = torch.arange(16, L + 16, 16).clamp(max=L).unique()
    sel = dhsa_select(q, k, budget=320, boundaries=[ends], options=config.dhsa_options())
    calls, tiles = [], attention._attend_tiles
    monkeypatch.setattr(attention, "_attend_tiles", lambda *a: calls.append(a[0].shape[0]) or tiles(*a))
    monkeypatch.setattr(attention, "_attend_split", lambda *a: pytest.fail("DHSA's tiles share their heads' pattern"))
    torch.testing.assert_close(sparse_attention(q, k, v, sel), masked_attention(q, k, v, sel), atol=1e-5, rtol=1e-5)
    n_tiles, Hs = sel.key_index.shape[2], sel.key_index.shape[1]
    assert sum(calls) == n_tiles * Hs and len(calls) < n_tiles / 2


@pytest.mark.skipif(attention._flash_with_lse is None, reason="this torch has no CPU flash kernel with its LSE")
@pytest.mark.parametrize("masked", [True, False])
def test_tile_products_equal_the_flash_kernel(masked):
    """_attend_tiles by products and a softmax (fp32 tiles of <= 128 rows) gives the flash kernel's attention."""
    g = torch.Generator().manual_seed(5)
    N, M, K, D = 6, 64, 320, 64
    q, k, v = torch.randn(N, M, D, generator=g), torch.randn(N, K, D, generator=g), torch.randn(N, K, D, generator=g)
    slot_pos = torch.cat([torch.full((K - M,), -1), torch.arange(M)])  # keys before the tile, then its own
    bias = torch.where(slot_pos[None, :] <= torch.arange(M)[:, None], 0.0, float("-inf"))[None, None] if masked \
        else None
    assert attention._products_for(q, M) and not attention._products_for(q, 192)
    assert not attention._products_for(q.double(), M)
    want = attention._flash_with_lse(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=0.125)[0][:, 0]
    got = attention._attend_tiles(q, k, v, bias, 0.125, torch.empty(N * M * K))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if masked:  # the bias added only from the first column some row does not see (the tile's own keys)
        got = attention._attend_tiles(q, k, v, bias, 0.125, torch.empty(N * M * K), masked_from=K - M + 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention._attend_tiles(q, k, v, bias, 0.125, None), want, atol=0, rtol=0)


PLAIN = dict(token_rescore=0, rescore_queries=0, rescore_window=0)  # chunk scores alone, unless a case says
CHUNK_CASES = [  # L, Hq, Hkv, Lq, extra options: uniform chunks in which the chunk-level top-k applies
    (2048, 8, 2, 2048, {}),
    (4096, 6, 2, 4096, dict(head_pooling="max")),
    (2048, 4, 2, 2048, dict(share_heads=True)),
    (2048, 8, 2, 2048, dict(query_pooling="mean")),
    (3072, 8, 2, 1024, {}),                              # queries after a cache (q_offset > 0)
    (2048, 8, 2, 2048, dict(dense_tail=0, sink_tokens=16, local_tokens=48)),
    (4096, 8, 2, 4096, dict(token_rescore=2, rescore_queries=8)),  # rescoring's candidates over chunks too
    (2048, 8, 2, 2048, dict(token_rescore=2)),
]


def record_results(monkeypatch, name: str) -> list:
    """What each call of select.<name> returns, in a list that fills as the selection runs."""
    calls, fn = [], getattr(dhsa, name)
    monkeypatch.setattr(dhsa, name, lambda *a: calls.append(fn(*a)) or calls[-1])
    return calls


def token_path_selection(monkeypatch, q, k, budget, ends, options):
    """The same selection with the chunk-level paths switched off (every tile on the token-level top-k)."""
    monkeypatch.setattr(dhsa, "_CHUNK_TOPK", False)
    return dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index


@pytest.mark.parametrize("L,Hq,Hkv,Lq,extra", CHUNK_CASES)
def test_chunk_level_topk_keeps_the_token_topk_keys(monkeypatch, L, Hq, Hkv, Lq, extra):
    """Top-N_b over whole chunks (utils.methods.dhsa.select._chunk_topk) keeps exactly the keys of the token-level top-k, and it
    does run (uniform chunks, budget, sinks and window in whole chunks)."""
    g = torch.Generator().manual_seed(L + Lq)
    q, k = torch.randn(1, Hq, Lq, 64, generator=g), torch.randn(1, Hkv, L, 64, generator=g)
    config = SparseAttentionConfig(method="dhsa", density=0.0625, **{**PLAIN, **extra})
    ends = torch.arange(16, L + 16, 16)
    budget, options = config.resolve_budget(L), config.dhsa_options()
    calls = record_results(monkeypatch, "_chunk_topk")
    fast = dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index
    assert calls and all(c is not None for c in calls)
    assert torch.equal(fast, token_path_selection(monkeypatch, q, k, budget, ends, options))


MARGIN_CASES = [  # L, Hq, Hkv, Lq, extra options: rescore_window with whole chunks at both cuts
    (4096, 4, 2, 4096, dict(min_budget=1024, token_rescore=3, rescore_queries=4, rescore_window=512)),
    (3072, 4, 2, 1024, dict(min_budget=1024, token_rescore=3, rescore_queries=4, rescore_window=256)),
    (4096, 4, 2, 4096, dict(min_budget=1024, token_rescore=2, rescore_window=512, head_pooling="max")),
    (2048, 4, 2, 2048, dict(min_budget=1536, token_rescore=3, rescore_queries=4, rescore_window=512)),  # band > rest
    (4096, 4, 2, 4096, dict(min_budget=512, token_rescore=3, rescore_queries=4, rescore_window=512)),  # keep = forced
]


@pytest.mark.parametrize("L,Hq,Hkv,Lq,extra", MARGIN_CASES)
@pytest.mark.parametrize("tie", [False, True])
def test_rescore_window_ranks_the_chunks_once(monkeypatch, L, Hq, Hkv, Lq, extra, tie):
    """rescore_window on whole chunks: one chunk ranking cut twice (select._whole_chunk_split) gives the kept keys
    and the band of two token-level rankings, so the same selection; with every chunk tied it declines and the
    token path decides."""
    g = torch.Generator().manual_seed(L + Lq)
    q, k = torch.randn(1, Hq, Lq, 64, generator=g), torch.randn(1, Hkv, L, 64, generator=g)
    if tie:  # every chunk after the sinks a copy of one chunk: all their scores tie
        k[:, :, 64:] = k[:, :, 64:80].repeat(1, 1, (L - 64) // 16, 1)
    config = SparseAttentionConfig(method="dhsa", density=0.0625, **extra)
    ends = torch.arange(16, L + 16, 16)
    budget, options = config.resolve_budget(L), config.dhsa_options()
    calls = record_results(monkeypatch, "_whole_chunk_split")
    got = dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index
    declined = [c is None or c is dhsa._TIED for c in calls]  # (tied groups are halved: the first tiles, which
    assert calls and (dhsa._TIED in calls if tie else not any(declined))  # keep all they see, then split alone)
    want = token_path_selection(monkeypatch, q, k, budget, ends, options)
    if tie:  # the same keys up to swapping copies of one key (tied exactly; top-k breaks such ties either way)
        copy_of = lambda key_index: torch.sort(torch.where(key_index >= 64, 64 + (key_index - 64) % 16, key_index),
                                               -1).values  # noqa: E731
        got, want = copy_of(got), copy_of(want)
    assert torch.equal(got, want)


def test_a_tie_in_one_tile_ranks_only_a_few_tiles_token_by_token(monkeypatch):
    """Where chunk scores tie at a cut in one tile, its group is halved until at most _TIED_GROUP tiles rank tokens;
    the other tiles keep the whole-chunk split, and the selection is the token path's."""
    L, Lq = 4096, 4096
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(1, 4, Lq, 64, generator=g), torch.randn(1, 2, L, 64, generator=g)
    config = SparseAttentionConfig(method="dhsa", density=0.0625, min_budget=1024, rescore_window=512)
    ends = torch.arange(16, L + 16, 16)
    budget, options = config.resolve_budget(L), config.dhsa_options()
    split, sizes = dhsa._whole_chunk_split, []

    def tied_at_tile_40(chunk_scores, ends, tile_end, *rest):  # pretend tile 40 (keys < 41 * 64) has a tie
        sizes.append(tile_end.numel())
        if bool((tile_end == 41 * 64).any()):
            return dhsa._TIED
        return split(chunk_scores, ends, tile_end, *rest)

    monkeypatch.setattr(dhsa, "_whole_chunk_split", tied_at_tile_40)
    got = dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index
    assert min(sizes) <= dhsa._TIED_GROUP < max(sizes)  # halved down to a few tiles
    monkeypatch.setattr(dhsa, "_whole_chunk_split", split)
    assert torch.equal(got, token_path_selection(monkeypatch, q, k, budget, ends, options))


@pytest.mark.parametrize("case", ["learned", "odd_budget", "tie"])
def test_chunk_level_topk_falls_back_where_it_cannot_be_exact(monkeypatch, case):
    """Learned boundaries, a budget that ends inside a chunk, or two chunks tied at the cut: the token-level top-k
    decides (the same keys as with the chunk path switched off)."""
    g = torch.Generator().manual_seed(5)
    L = 2048
    q, k = torch.randn(1, 8, L, 64, generator=g), torch.randn(1, 2, L, 64, generator=g)
    ends = random_ends(L, L // 16, g) if case == "learned" else torch.arange(16, L + 16, 16)
    budget = 250 if case == "odd_budget" else 256
    if case == "tie":  # every chunk after the sinks a copy of one chunk: all their scores tie
        k[:, :, 64:] = k[:, :, 64:80].repeat(1, 1, (L - 64) // 16, 1)
    options = SparseAttentionConfig(method="dhsa", budget=budget, **PLAIN).dhsa_options()  # _chunk_topk decides
    calls = record_results(monkeypatch, "_chunk_topk")
    got = dhsa_select(q, k, budget=budget, boundaries=[ends], options=options).key_index
    assert calls and any(c is None for c in calls)
    assert torch.equal(got, token_path_selection(monkeypatch, q, k, budget, ends, options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [{}, dict(robust_chunk_repr=False, center_keys=False), dict(head_pooling="mean")])
def test_decode_chunk_vectors_kept_between_steps_are_the_same_numbers(monkeypatch, dtype, extra):
    """Sparse decode steps with the chunk vectors kept in the layer state (DecodeChunks, extended key by key,
    across prefix-sum slices) give bit for bit the chunk vectors and centring of a recomputation, and the same
    kept keys as a step without the cache."""
    import utils.methods.dhsa.scores as dhsa_math
    from utils.methods.dhsa.scores import decode_boundaries
    from utils.methods import METHODS, LayerContext
    monkeypatch.setattr(dhsa_math, "_PREFIX_SLICE", 100)  # cross slice boundaries within a few steps
    g = torch.Generator().manual_seed(7)
    P, steps, Hq, Hkv = 590, 25, 8, 2
    q_all = torch.randn(1, Hq, P + steps, 32, generator=g).to(dtype)
    k_all = torch.randn(1, Hkv, P + steps, 32, generator=g).to(dtype)
    config = SparseAttentionConfig(method="dhsa", budget=96, chunk_size=16, decode="sparse", **extra)
    context = LayerContext()
    METHODS["dhsa"].select(q_all[:, :, :P], k_all[:, :, :P], config, context)  # prefill: the layer's state
    state = context.state["dhsa"]
    options = config.dhsa_options()
    expand = Hq // Hkv if options.head_pooling == "none" else 1
    for Lk in range(P + 1, P + steps + 1):
        q, k = q_all[:, :, Lk - 1:Lk], k_all[:, :, :Lk]
        for _ in range(2):  # a step may be repeated on the same cache (the latency benchmark does)
            got = METHODS["dhsa"].select(q, k, config, context).key_index
        entry = state["decode_cache"]["chunks"][0]
        ends = decode_boundaries(state["ends"][0], P, Lk)
        chunk_k, centring = entry.step(k[0], ends, options.center_keys)
        ref = dhsa.chunk_vectors(k[0], ends, options.robust_chunk_repr)  # per KV head
        assert torch.equal(chunk_k, ref)
        if options.center_keys:
            ref_mean, ref_weight = dhsa.tile_key_means(ref, ends, torch.tensor([Lk]), options.robust_chunk_repr)
            assert torch.equal(centring[0], ref_mean) and torch.equal(centring[1], ref_weight)
        if options.query_pooling == "max" and expand > 1:  # the query heads of a KV head scored in one product: the same scores
            # (up to fp32 rounding: a GEMM of expand rows, not expand products of one row)
            heads_ref = ref.repeat_interleave(expand, 0)
            ref_centring = None if centring is None else (centring[0].repeat_interleave(expand, 0), centring[1])
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            want = max_pooled_chunk_scores(q[0].float(), heads_ref, 64, "mean", ref_centring, starts, torch.tensor([Lk]))
            torch.testing.assert_close(entry.scores(q[0], chunk_k, centring), want, rtol=1e-5, atol=1e-5)  # fp32 rounding
        opts = options.replace(local_tokens=max(options.local_tokens, Lk - P),
                               head_pooling="mean" if options.head_pooling == "none" else options.head_pooling)
        plain = dhsa._select_on_pytorch(q, k, 96, [ends], opts, expand, state.get("question_keys"))
        assert torch.equal(got, plain.key_index)


@pytest.mark.skipif(attention._flash_with_lse is None, reason="this torch has no CPU flash kernel with its LSE")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_tail_without_a_mask_equals_masked_attention(monkeypatch, dtype):
    """The last Lq < Lk queries (DHSA's dense question tail) as one unmasked call + a small causal block."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 6, 70, 64, generator=g), torch.randn(1, 2, 900, 64, generator=g), \
        torch.randn(1, 2, 900, 64, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fast = dense_attention(q, k, v)
    monkeypatch.setattr(attention, "_flash_with_lse", None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, dense_attention(q, k, v), atol=tol, rtol=tol)


@pytest.mark.parametrize("Hq, Hkv, Dv", [(14, 2, 64), (9, 3, 64), (4, 4, 64), (6, 2, 32)])
def test_dense_decode_step_with_grouped_heads_equals_repeated_keys(Hq, Hkv, Dv):
    """A dense decode step on the CPU stacks the query heads of a KV head as queries of it: the same output as
    attention on K/V repeated per query head, with the softmax written out."""
    g = torch.Generator().manual_seed(Hq + Hkv)
    B, L, D = 2, 300, 64
    q, k, v = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, L, D, generator=g), \
        torch.randn(B, Hkv, L, Dv, generator=g)
    k_rep, v_rep = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    expected = torch.softmax(q @ k_rep.transpose(-1, -2) * 0.3, dim=-1) @ v_rep
    got = dense_attention(q, k, v, scale=0.3)
    assert got.shape == (B, Hq, 1, Dv)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
