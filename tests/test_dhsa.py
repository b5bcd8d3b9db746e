"""DHSA attention on random inputs: exactness at full budget, causality, the per-query budget, chunking edge
cases, decode (Algorithm 2) and argument checking."""

import math

import pytest
import torch

import utils.methods.dhsa.scores as dhsa_math
from utils.attention import dense_attention, sparse_attention
from utils.methods.dhsa.boundaries import as_boundary_list, fixed_size_ends
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods.dhsa.select import dhsa_attention, dhsa_select
from utils.methods.dhsa.scores import chunk_vectors, decode_boundaries, max_pooled_chunk_scores
from utils.selection import Selection, full_selection

SHAPES = [  # B, Hq, Hkv, L, D
    (1, 4, 4, 97, 16),    # MHA, L not a multiple of the query chunk
    (2, 4, 2, 130, 8),    # GQA 2:1, batch
    (1, 6, 2, 64, 32),    # GQA 3:1, L == one chunk
]


def rand_qkv(B, Hq, Hkv, L, D, seed=0, Lq=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq or L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    return q, k, v


def keys_read(q, k, **kwargs):
    """Attention weights [B, Hq, Lq, Lk] of dhsa_attention, read out through one-hot values."""
    B, Hkv, Lk, _ = k.shape
    eye = torch.eye(Lk, dtype=q.dtype).expand(B, Hkv, Lk, Lk).contiguous()
    return dhsa_attention(q, k, eye, **kwargs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("query_chunk", [1, 16, 256])
def test_full_budget_equals_dense(shape, query_chunk):
    q, k, v = rand_qkv(*shape)
    L = shape[3]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(shape[1] // shape[2], 1), v.repeat_interleave(shape[1] // shape[2], 1), is_causal=True)
    out = dhsa_attention(q, k, v, budget=L, query_chunk=query_chunk)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    out = dhsa_attention(q, k, v, density=1.0, query_chunk=query_chunk, boundaries=[1, 2, 3, L // 2, L])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [1, 5, 24, 50])
def test_budget_and_causality(shape, budget):
    q, k, _ = rand_qkv(*shape, seed=budget)
    L = shape[3]
    for boundaries in (None, [1, 2, 3, 10, 11, 40, L - 1, L]):
        w = keys_read(q, k, budget=budget, query_chunk=16, boundaries=boundaries, dense_tail=20)
        read = w > 0
        tail = max(0, L - 20) // 16 * 16  # the dense question tail: the tiles of the last 20 queries read every key
        assert torch.triu(read, diagonal=1).sum() == 0, "a query read a future key"
        assert read[:, :, :tail].sum(-1).le(budget).all(), "a query read more keys than its budget"
        assert read[:, :, tail:].sum(-1).equal(torch.arange(tail + 1, L + 1).expand_as(read[:, :, tail:, 0]))
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # every query reads something


def test_query_reads_exactly_its_budget_when_enough_keys_are_visible():
    q, k, _ = rand_qkv(1, 2, 1, 200, 16, seed=3)
    w = keys_read(q, k, budget=32, query_chunk=1, sink_tokens=0, local_tokens=0, dense_tail=0)
    counts = (w > 0).sum(-1)[0, 0]
    positions = torch.arange(200)
    torch.testing.assert_close(counts, torch.clamp(positions + 1, max=32))


def test_selection_follows_chunk_scores():
    """With no always-kept keys, a tile keeps the chunks whose keys align with its queries."""
    L, D = 64, 8
    q = torch.zeros(1, 1, L, D)
    k = torch.zeros(1, 1, L, D)
    q[..., 0] = 1.0
    k[0, 0, 20:28, 0] = 5.0  # chunk [20, 28) is the only one aligned with the queries
    sel = dhsa_select(q, k, budget=8, boundaries=[torch.tensor([20, 28, 64])],
                      options=DHSAOptions(query_chunk=64, sink_tokens=0, local_tokens=0))
    assert sel.key_index[0, 0, 0].tolist() == list(range(20, 28))


def test_length_normalisation_is_eq4():
    k = torch.randn(2, 10, 4)
    ends = torch.tensor([1, 4, 10])
    got = chunk_vectors(k, ends, robust=True)
    want = torch.stack([k[:, 0:1].sum(1), k[:, 1:4].sum(1) / math.sqrt(3), k[:, 4:10].sum(1) / math.sqrt(6)], 1)
    torch.testing.assert_close(got, want)
    mean = chunk_vectors(k, ends, robust=False)
    torch.testing.assert_close(mean[:, 2], k[:, 4:10].mean(1))


def test_prefix_sums_over_several_slices(monkeypatch):
    monkeypatch.setattr(dhsa_math, "_PREFIX_SLICE", 7)
    k = torch.randn(3, 50, 4)
    ends = torch.tensor([1, 7, 8, 14, 15, 49, 50])
    starts = torch.cat([torch.tensor([0]), ends[:-1]])
    want = torch.stack([k[:, s:e].sum(1) / math.sqrt(e - s) for s, e in zip(starts.tolist(), ends.tolist())], 1)
    torch.testing.assert_close(chunk_vectors(k, ends), want, atol=1e-5, rtol=1e-5)


def test_variable_chunks_and_tile_groups(monkeypatch):
    """Length-1 chunks, chunks longer than a tile, tiles processed in several groups: same result."""
    q, k, v = rand_qkv(1, 4, 2, 150, 16, seed=7)
    bounds = [1, 2, 3, 4, 60, 61, 149, 150]
    whole = dhsa_attention(q, k, v, budget=20, query_chunk=8, boundaries=bounds)
    monkeypatch.setattr(dhsa_math, "SCORE_ELEMENTS", 300)  # forces one tile per group
    torch.testing.assert_close(dhsa_attention(q, k, v, budget=20, query_chunk=8, boundaries=bounds), whole)


def test_share_heads_gives_one_selection_for_all_heads():
    q, k, _ = rand_qkv(1, 4, 2, 80, 16, seed=2)
    sel = dhsa_select(q, k, budget=10, boundaries=[fixed_size_ends(80, 8)],
                      options=DHSAOptions(query_chunk=16, share_heads=True))
    assert torch.equal(sel.key_index[:, 0], sel.key_index[:, 1])
    sel = dhsa_select(q, k, budget=10, boundaries=[fixed_size_ends(80, 8)],
                      options=DHSAOptions(query_chunk=16, sink_tokens=0, local_tokens=0))
    assert not torch.equal(sel.key_index[:, 0], sel.key_index[:, 1])


def test_decode_boundaries_follow_algorithm_2():
    prompt = torch.tensor([3, 7, 10])
    assert decode_boundaries(prompt, 10, 11).tolist() == [3, 7, 10, 11]           # first generated token
    assert decode_boundaries(prompt, 10, 14).tolist() == [3, 7, 10, 13, 14]       # 3 generated so far
    assert decode_boundaries(prompt, 10, 12).tolist() == [3, 7, 10, 11, 12]


def test_decode_step_equals_prefill_row_at_full_budget():
    q, k, v = rand_qkv(1, 4, 2, 90, 16, seed=5)
    full = dhsa_attention(q, k, v, budget=90, query_chunk=16)
    step = dhsa_attention(q[:, :, -1:], k, v, budget=90, query_chunk=16,
                          boundaries=decode_boundaries(fixed_size_ends(80, 16), 80, 90))
    torch.testing.assert_close(step, full[:, :, -1:], atol=2e-6, rtol=1e-5)


def test_decode_step_reads_at_most_budget():
    q, k, _ = rand_qkv(1, 4, 2, 300, 16, seed=6, Lq=1)
    w = keys_read(q, k, budget=17, boundaries=decode_boundaries(fixed_size_ends(290, 16), 290, 300))
    assert ((w > 0).sum(-1) <= 17).all() and ((w > 0).sum(-1) == 17).all()


@pytest.mark.parametrize("head_pooling", ["mean", "none"])
def test_selection_mask_matches_executor(head_pooling):
    q, k, _ = rand_qkv(2, 4, 2, 70, 16, seed=8)
    sel = dhsa_select(q, k, budget=12, boundaries=as_boundary_list([5, 9, 30, 70], 2, 70),
                      options=DHSAOptions(query_chunk=16, head_pooling=head_pooling, sink_tokens=2, local_tokens=4))
    mask = sel.mask(70, 70)  # [B, Hs, Lq, Lk]: Hs = Hkv (one selection per GQA group) or Hq (per query head)
    assert mask.shape[1] == {"mean": 2, "none": 4}[head_pooling]
    eye = torch.eye(70).expand(2, 2, 70, 70).contiguous()
    read = sparse_attention(q, k, eye, sel) > 0  # [B, Hq, Lq, Lk]
    assert torch.equal(read, mask.repeat_interleave(4 // mask.shape[1], dim=1))


def test_executor_with_per_query_head_selection_and_rule():
    """Per-query-head lists plus a per-query window rule equal dense attention with the same mask."""
    q, k, v = rand_qkv(1, 4, 2, 40, 8, seed=9)
    sel = full_selection(1, 4, 40, 40, 8)
    sel.keep = lambda qp, kp: qp - kp < 5
    pos = torch.arange(40)
    window = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 5)
    ref = dense_attention(q, k, v, attention_mask=window[None, None])
    torch.testing.assert_close(sparse_attention(q, k, v, sel), ref, atol=2e-6, rtol=1e-5)


def test_softcap_matches_manual_math():
    q, k, v = rand_qkv(1, 2, 2, 30, 8, seed=10)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * 8 ** -0.5 / 5.0) * 5.0
    scores = scores.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(dhsa_attention(q, k, v, budget=30, softcap=5.0, query_chunk=8), ref,
                               atol=2e-6, rtol=1e-5)


def test_bf16_close_to_fp32():
    q, k, v = rand_qkv(1, 4, 2, 128, 16, seed=11)
    ref = dhsa_attention(q, k, v, budget=32, query_chunk=32)
    out = dhsa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), budget=32, query_chunk=32)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("kwargs, message", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(budget=0), "budget"),
    (dict(), "budget"), (dict(budget=4, boundaries=[5, 3, 40]), "increasing"),
    (dict(budget=4, boundaries=[10, 50]), "increasing"), (dict(budget=4, query_chunk=0), "query_chunk"),
    (dict(budget=4, no_such_option=1), "no_such_option"),
])
def test_bad_arguments(kwargs, message):
    q, k, v = rand_qkv(1, 2, 2, 40, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        dhsa_attention(q, k, v, **kwargs)


def test_dhsa_options_are_the_config_fields():
    """DHSAOptions: the selection's options, taken from SparseAttentionConfig by field name, with its defaults."""
    import dataclasses
    config_fields = {f.name for f in dataclasses.fields(SparseAttentionConfig)}
    assert {f.name for f in dataclasses.fields(DHSAOptions)} <= config_fields
    assert SparseAttentionConfig().dhsa_options() == DHSAOptions() == DHSAOptions(
        query_chunk=64, robust_chunk_repr=True, sink_tokens=64, local_tokens=128, share_heads=False,
        query_pooling="max", head_pooling="none", center_keys=True)
    config = SparseAttentionConfig(query_chunk=16, robust_chunk_repr=False, sink_tokens=1, local_tokens=2,
                                   share_heads=True, query_pooling="mean", head_pooling="max", center_keys=False)
    assert dataclasses.asdict(config.dhsa_options()) == {name: getattr(config, name)
                                                         for name in dataclasses.asdict(DHSAOptions())}
    with pytest.raises(dataclasses.FrozenInstanceError):
        DHSAOptions().sink_tokens = 0
    for bad in (dict(query_pooling="median"), dict(head_pooling="sum"), dict(query_chunk=0), dict(sink_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DHSAOptions(**bad)


def test_bad_shapes():
    q, k, v = rand_qkv(1, 3, 2, 40, 8)
    with pytest.raises(ValueError, match="multiple"):
        dhsa_attention(q, k, v, budget=4)
    with pytest.raises(ValueError, match="expected"):
        dhsa_attention(q[0], k, v, budget=4)
    with pytest.raises(ValueError, match="selection"):
        sparse_attention(q[:, :2], k, v, Selection(torch.zeros(1, 2, 1, 3, dtype=torch.long), 4))


def test_no_length_squared_memory(rss_growth_mib):
    """64K tokens at budget 256: an L x L fp32 score matrix would need 16 GiB; the run must stay under 1.5 GiB."""
    grown_mib = rss_growth_mib(
        "import torch\n"
        "from utils.methods.dhsa.select import dhsa_attention\n"
        "q = torch.randn(1, 1, 65536, 16); k = torch.randn(1, 1, 65536, 16); v = torch.randn(1, 1, 65536, 16)",
        "dhsa_attention(q, k, v, budget=256)")
    assert grown_mib < 1536, f"peak memory grew by {grown_mib} MiB"


@pytest.mark.parametrize("L, window, softcap", [(100, 16, None), (130, 40, 5.0), (30, 64, None)])
def test_sliding_window_attention_is_exact(L, window, softcap):
    from utils.attention import sliding_window_attention
    q, k, v = rand_qkv(1, 4, 2, L, 8, seed=L)
    ref = dense_attention(q, k, v, window=window, softcap=softcap)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, softcap=softcap, query_chunk=32), ref,
                               atol=2e-6, rtol=1e-5)
    step = sliding_window_attention(q[:, :, -1:], k, v, window, softcap=softcap)  # decode
    torch.testing.assert_close(step, ref[:, :, -1:], atol=2e-6, rtol=1e-5)


def test_max_pooled_chunk_scores_brute_force(monkeypatch):
    q = torch.randn(4, 70, 8)              # Hq = 4, Lq = 70 (last tile partial)
    chunk_k = torch.randn(2, 9, 8)         # Hkv = 2
    group_q = q.view(2, 2, 70, 8).sum(1)   # queries of a GQA group are pooled first
    want = torch.stack([(group_q[:, t:t + 16] @ chunk_k.transpose(1, 2)).amax(1) for t in range(0, 70, 16)], 1)
    torch.testing.assert_close(max_pooled_chunk_scores(q, chunk_k, 16), want)
    monkeypatch.setattr(dhsa_math, "SCORE_ELEMENTS", 10)  # one tile per slice
    torch.testing.assert_close(max_pooled_chunk_scores(q, chunk_k, 16), want)


def test_max_pooling_keeps_what_one_query_needs():
    """One query of a tile aligns with a distant chunk; mean pooling loses it, max pooling keeps it."""
    L, D = 96, 8
    q = torch.zeros(1, 1, L, D)
    k = torch.zeros(1, 1, L, D)
    q[..., 1] = 1.0                     # every query weakly likes direction 1 ...
    k[0, 0, 64:80, 1] = 1.0             # ... which the recent chunk [64, 80) has
    q[0, 0, 95, 0] = 4.0                # the last query alone asks for direction 0 ...
    k[0, 0, 8:16, 0] = 1.0              # ... held by the distant chunk [8, 16)
    ends = [torch.tensor([8, 16, 64, 80, 96])]
    options = DHSAOptions(query_chunk=32, sink_tokens=0, local_tokens=0, token_rescore=0)  # the chunk scores' own choice
    kept = {pooling: dhsa_select(q, k, budget=8, boundaries=ends, options=options.replace(query_pooling=pooling))
            .key_index[0, 0, -1].tolist() for pooling in ("max", "mean")}
    assert kept["max"] == list(range(8, 16))
    assert kept["mean"] != list(range(8, 16))


@pytest.mark.parametrize("query_pooling", ["max", "mean"])
@pytest.mark.parametrize("tile", [1, 4])  # a decode step (Algorithm 2) and a prefill tile
def test_head_max_pooling_keeps_what_one_gqa_head_needs(query_pooling, tile):
    """Regression (gemma-3-270m NIAH, 4 query heads on 1 KV head): the retrieval head of a GQA group wants the
    needle's chunk, the group's other heads point away from it; averaging their queries loses the chunk,
    head_pooling="max" (each head scores, the best head counts) keeps it."""
    L, D = 16, 4
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 4:8, 0] = 1.0                   # the "needle" chunk [4, 8): direction 0
    k[0, 0, 8:12, 1] = 1.0                  # a distractor chunk [8, 12): direction 1
    q = torch.zeros(1, 2, tile, D)
    q[0, 0, :, 0] = 10.0                    # head 0 (retrieval head) asks for the needle
    q[0, 1, :, 0] = -9.0                    # head 1 points away from it ...
    q[0, 1, :, 1] = 2.0                     # ... and weakly at the distractor
    options = DHSAOptions(query_chunk=tile, sink_tokens=0, local_tokens=0, query_pooling=query_pooling, token_rescore=0)  # the chunk scores' own choice
    kept = {pooling: dhsa_select(q, k, budget=4, boundaries=[torch.tensor([4, 8, 12, 16])],
                                 options=options.replace(head_pooling=pooling)).key_index[0, 0, -1].tolist()
            for pooling in ("max", "mean")}
    assert kept["max"] == [4, 5, 6, 7]
    assert kept["mean"] == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="head_pooling"):
        options.replace(head_pooling="median")


def test_center_keys_removes_the_chunk_length_bias():
    """Keys share a large common component m. With variable-length chunks, the robust chunk vector
    (sum / sqrt(len)) scores a long chunk sqrt(len) * (q . m) higher whatever it holds; centring on the causal
    mean key removes that, so the short chunk holding the key that matches the query wins."""
    torch.manual_seed(0)
    D, L = 16, 200
    common = torch.randn(D) * 3
    k = common + 0.3 * torch.randn(1, 1, L, D)
    q = torch.zeros(1, 1, 1, D)
    q[..., :] = common / common.norm()  # the query also points along m (q . m > 0)
    target = 120
    k[0, 0, target] += 2.0 * common / common.norm() + 4.0 * torch.randn(D).sign()
    q = q + 0.5 * torch.sign(k[0, 0, target] - common) / D ** 0.5
    ends = torch.tensor([4, 100, 119, 121, 199, 200])  # long chunks around a 2-key chunk holding the target
    kept = {}
    for center in (False, True):
        sel = dhsa_select(q, k, budget=8, boundaries=[ends],
                          options=DHSAOptions(query_chunk=1, sink_tokens=1, center_keys=center))
        kept[center] = set(sel.key_index[0, 0, 0].tolist())
    assert target in kept[True]
    assert target not in kept[False]


def test_sequence_shorter_than_one_chunk():
    """L below the chunk size (a short prompt) is one chunk; at full budget the output is dense attention."""
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    assert fixed_size_ends(10, 16).tolist() == [10]
    torch.testing.assert_close(dhsa_attention(q, k, v, budget=10), dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_bound_scores_are_at_least_every_key_of_the_chunk():
    """chunk_score="bound": [q+, q-] . [kmax, kmin] >= q . k for every key k of the chunk, with equality for a chunk
    of one key; with centring, the bound of the centred keys (bound - q . m_t)."""
    g = torch.Generator().manual_seed(0)
    k, q = torch.randn(2, 70, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    ends = torch.tensor([1, 16, 17, 40, 70])
    bound = torch.einsum("hqd,hcd->hqc", dhsa_math.bound_queries(q), dhsa_math.bound_chunk_keys(k, ends))
    chunk_of_key = torch.searchsorted(ends, torch.arange(70), right=True)
    best = torch.full_like(bound, float("-inf")).scatter_reduce(
        -1, chunk_of_key.expand(2, 9, 70), torch.einsum("hqd,hkd->hqk", q, k), "amax")
    assert (bound >= best - 1e-5).all()
    torch.testing.assert_close(bound[..., [0, 2]], best[..., [0, 2]])  # one-key chunks: the bound is that key
    key_mean, weight = dhsa_math.bound_centring(k, ends, torch.tensor([40, 70]))
    assert torch.equal(weight, torch.ones(5))
    shift = (dhsa_math.bound_queries(q) * key_mean[:, 1:2]).sum(-1)
    torch.testing.assert_close(shift, (q * key_mean[:, 1:2, :8]).sum(-1))  # [q+, q-] . [m, m] = q . m


def test_bound_keeps_a_single_strong_key_that_the_chunk_mean_misses():
    """Planted needle: one key of a distant 16-key chunk matches the last tile's queries strongly, its 15
    neighbours point away; another chunk matches a little with every key. The chunk mean ranks the uniform chunk
    first, the bound on the best key ranks the needle's chunk first."""
    L, D = 128, 4
    k = torch.zeros(1, 1, L, D)
    k[0, 0, 16:32, 1] = -1.0            # the needle's chunk: 15 keys pointing away ...
    k[0, 0, 20, :] = 0.0
    k[0, 0, 20, 0] = 6.0                # ... and one key, 20, that matches direction 0 strongly
    k[0, 0, 48:64, 0] = 1.0             # a chunk whose every key matches a little
    q = torch.zeros(1, 1, L, D)
    q[0, 0, :, 0], q[0, 0, :, 1] = 1.0, 1.0
    ends = [torch.arange(16, L + 1, 16)]
    options = DHSAOptions(query_chunk=32, sink_tokens=0, local_tokens=0, center_keys=False, dense_tail=0, token_rescore=0)  # the chunk scores' own choice
    kept = {score: dhsa_select(q, k, budget=16, boundaries=ends, options=options.replace(chunk_score=score))
            .key_index[0, 0, -1].tolist() for score in ("mean", "bound")}
    assert 20 in kept["bound"] and kept["bound"] == list(range(16, 32))
    assert 20 not in kept["mean"]


@pytest.mark.parametrize("shape", SHAPES)
def test_bound_scores_keep_budget_causality_and_full_budget(shape):
    """chunk_score="bound" through dhsa_attention: dense at full budget; at a small budget no future key and at
    most N_b keys per query (before the dense tail); a sparse decode step reads at most N_b keys."""
    q, k, v = rand_qkv(*shape, seed=4)
    L, G = shape[3], shape[1] // shape[2]
    ref = dense_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    out = dhsa_attention(q, k, v, budget=L, query_chunk=16, chunk_score="bound")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for boundaries in (None, [1, 2, 3, 10, 11, 40, L - 1, L]):
        read = keys_read(q, k, budget=24, query_chunk=16, boundaries=boundaries, chunk_score="bound", dense_tail=0) > 0
        assert torch.triu(read, diagonal=1).sum() == 0, "a query read a future key"
        assert read.sum(-1).le(24).all(), "a query read more keys than its budget"
    step = keys_read(q[:, :, -1:], k, budget=24, query_chunk=16, chunk_score="bound") > 0
    assert step.sum(-1).le(24).all()
    with pytest.raises(ValueError, match="chunk_score"):
        DHSAOptions(chunk_score="max")


@pytest.mark.parametrize("head_pooling", ["mean", "max"])
@pytest.mark.parametrize("pool", ["max", "mean"])
def test_softmax_pooled_chunk_scores_brute_force(head_pooling, pool):
    """query_pooling "softmax_max" / "softmax_mean": per query, log p over the chunks it sees (mean key / sqrt(D)
    + log len, softmax), then the tile's best query or the log of its mean p; against a direct computation."""
    g = torch.Generator().manual_seed(2)
    L, T, D = 150, 32, 8
    q, k = torch.randn(4, L, D, generator=g), torch.randn(2, L, D, generator=g)
    ends = torch.tensor([1, 5, 40, 41, 90, 150])
    got = dhsa_math.softmax_pooled_chunk_scores(q, k, ends, T, pool, head_pooling)
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    mu = torch.stack([k[:, s:e].mean(1) for s, e in zip((ends - lengths).tolist(), ends.tolist())], 1)
    qq = q.view(2, 2, L, D)
    if head_pooling == "mean":
        qq = qq.sum(1, keepdim=True)
    logits = torch.einsum("hgld,hcd->hglc", qq, mu) / math.sqrt(D) + lengths.float().log()
    logits = logits.masked_fill((ends - lengths)[None, :] > torch.arange(L)[:, None], float("-inf"))
    logp = logits.log_softmax(-1)
    for t in range(math.ceil(L / T)):
        rows = logp[:, :, t * T:(t + 1) * T]
        ref = (rows.amax(2) if pool == "max" else rows.exp().mean(2).log()).amax(1)
        torch.testing.assert_close(got[:, t], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["softmax_max", "softmax_mean"])
def test_softmax_pooling_keeps_budget_causality_and_full_budget(pooling):
    q, k, v = rand_qkv(2, 4, 2, 130, 8, seed=6)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    out = dhsa_attention(q, k, v, budget=130, query_chunk=16, query_pooling=pooling)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    read = keys_read(q, k, budget=24, query_chunk=16, query_pooling=pooling, dense_tail=0,
                     boundaries=[1, 2, 3, 10, 11, 40, 129, 130]) > 0
    assert torch.triu(read, diagonal=1).sum() == 0 and read.sum(-1).le(24).all()
