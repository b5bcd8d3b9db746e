"""DHSA's token-level refinement: `token_rescore` (the chunk scores pick token_rescore x N_b candidate keys, the
tile's queries rescore them key by key and the N_b best stay) and `exact_tail` (the last tiles of a prefill rescore
every visible key). Checked against a brute-force reference, for the budget, causality and full-budget equality,
and on a planted key that chunk scores miss."""

import math

import pytest
import torch

from utils.attention import dense_attention
from utils.methods.dhsa.boundaries import fixed_size_ends
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods.dhsa.select import dhsa_attention, dhsa_select

OPTIONS = DHSAOptions(query_chunk=16, sink_tokens=4, local_tokens=8, token_rescore=0, rescore_queries=0,
                      rescore_window=0)  # chunk scores alone; each test turns rescoring on


def rand_qk(Hq=4, Hkv=2, L=200, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, Hq, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g)


def kept(selection, head, tile):
    row = selection.key_index[0, head, tile]
    return set(row[row >= 0].tolist())


def test_exact_tail_equals_brute_force_on_the_last_tile():
    """With every visible key a candidate (exact_tail), the last tile keeps its forced keys plus the keys with the highest
    softmax weight any of its queries gives them (per query head: head_pooling "none")."""
    q, k = rand_qk(L=150, seed=1)
    L, T, budget = 150, 16, 40
    ends = [fixed_size_ends(L, 8)]
    options = OPTIONS.replace(exact_tail=T)
    selection = dhsa_select(q, k, budget=budget, boundaries=ends, options=options)
    last_tile = math.ceil(L / T) - 1
    first = last_tile * T
    for head in range(4):
        keys = k[0, head // 2]
        logits = q[0, head, first:] @ keys.T * 16 ** -0.5  # [rows, L]
        pos = torch.arange(first, L)
        logits = logits.masked_fill(torch.arange(L)[None] > pos[:, None], float("-inf"))
        weight = torch.log_softmax(logits, dim=-1).amax(0)
        forced = set(range(4)) | set(range(L - 8, L))
        weight[list(forced)] = float("inf")
        assert kept(selection, head, last_tile) == set(torch.topk(weight, budget).indices.tolist())


def test_only_the_tail_tiles_are_exact():
    q, k = rand_qk(L=200, seed=2)
    ends = [fixed_size_ends(200, 8)]
    plain = dhsa_select(q, k, budget=40, boundaries=ends, options=OPTIONS)
    tail = dhsa_select(q, k, budget=40, boundaries=ends, options=OPTIONS.replace(exact_tail=40))
    n_tiles = plain.key_index.shape[2]
    first_exact = (200 - 40) // 16  # tiles holding the last 40 queries
    assert torch.equal(plain.key_index[:, :, :first_exact], tail.key_index[:, :, :first_exact])
    assert not torch.equal(plain.key_index[:, :, first_exact:], tail.key_index[:, :, first_exact:])
    assert n_tiles - first_exact == 3
    # with token_rescore too, the other tiles are rescored and the tail stays exact
    both = dhsa_select(q, k, budget=40, boundaries=ends, options=OPTIONS.replace(exact_tail=40, token_rescore=2.0))
    assert torch.equal(both.key_index[:, :, first_exact:], tail.key_index[:, :, first_exact:])
    assert not torch.equal(both.key_index[:, :, :first_exact], plain.key_index[:, :, :first_exact])


@pytest.mark.parametrize("head_pooling, share_heads", [("none", False), ("mean", False), ("max", False),
                                                       ("mean", True)])
@pytest.mark.parametrize("budget", [5, 24, 50])
def test_budget_and_causality_with_rescoring(head_pooling, share_heads, budget):
    q, k = rand_qk(L=130, seed=budget)
    options = OPTIONS.replace(token_rescore=3.0, exact_tail=20, head_pooling=head_pooling, share_heads=share_heads)
    selection = dhsa_select(q, k, budget=budget, boundaries=[fixed_size_ends(130, 8)], options=options)
    idx = selection.key_index
    tile_last = torch.clamp(torch.arange(1, idx.shape[2] + 1) * 16, max=130) - 1
    assert ((idx >= 0).sum(-1) <= budget).all()
    assert not ((idx >= 0) & (idx > tile_last[None, None, :, None])).any()
    for row in idx.reshape(-1, idx.shape[-1]):
        listed = row[row >= 0]
        assert (torch.diff(listed) > 0).all()
        assert len(listed) == len(set(listed.tolist()))


def test_full_budget_with_rescoring_is_dense():
    q, k = rand_qk(L=97, seed=3)
    v = torch.randn_like(k)
    out = dhsa_attention(q, k, v, budget=97, query_chunk=16, token_rescore=4.0, exact_tail=16,
                        sink_tokens=4, local_tokens=8)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_decode_step_rescored_but_never_exact():
    """One query (a decode step): token_rescore with every key a candidate keeps the keys it attends to most;
    exact_tail concerns prefills only, so a decode step with it selects as without it."""
    q, k = rand_qk(L=120, seed=4)
    step = q[:, :, -1:]
    ends = [fixed_size_ends(120, 8)]
    options = OPTIONS.replace(token_rescore=100.0, sink_tokens=0, local_tokens=0)
    selection = dhsa_select(step, k, budget=10, boundaries=ends, options=options)
    for head in range(4):
        logits = step[0, head, 0] @ k[0, head // 2].T
        assert kept(selection, head, 0) == set(torch.topk(logits, 10).indices.tolist())
    plain = dhsa_select(step, k, budget=10, boundaries=ends, options=OPTIONS)
    assert torch.equal(plain.key_index, dhsa_select(step, k, budget=10, boundaries=ends,
                                                    options=OPTIONS.replace(exact_tail=64)).key_index)


def test_rescoring_finds_a_key_that_chunk_scores_dilute():
    """A single key matching the last queries hides in a chunk of keys pointing away from them: its chunk's vector
    ranks low, so chunk scores alone miss it; rescoring the candidates of a wide enough chunk list keeps it."""
    torch.manual_seed(5)
    L, D, budget = 256, 16, 32
    q = torch.randn(1, 1, L, D) * 0.1
    k = torch.randn(1, 1, L, D) * 0.1
    direction = torch.zeros(D)
    direction[0] = 1.0
    q[0, 0, -16:] += 3 * direction
    needle = 100
    k[0, 0, needle] = 4 * direction
    k[0, 0, 96:112][torch.arange(16) != needle - 96] -= 1.5 * direction  # the rest of its chunk points away
    k[0, 0, 160:240] += 0.3 * direction  # mildly matching chunks elsewhere outrank the needle's chunk
    ends = [fixed_size_ends(L, 16)]
    options = OPTIONS.replace(head_pooling="mean", center_keys=False)
    plain = dhsa_select(q, k, budget=budget, boundaries=ends, options=options)
    refined = dhsa_select(q, k, budget=budget, boundaries=ends, options=options.replace(token_rescore=8.0))
    last_tile = plain.key_index.shape[2] - 1
    assert needle not in kept(plain, 0, last_tile)
    assert needle in kept(refined, 0, last_tile)


def test_bad_rescore_options():
    with pytest.raises(ValueError, match="token_rescore"):
        SparseAttentionConfig(token_rescore=0.5)
    with pytest.raises(ValueError, match="exact_tail"):
        SparseAttentionConfig(exact_tail=-1)


def test_sampled_rescoring_equals_brute_force_on_its_queries():
    """rescore_queries = R: the tile's candidates are ranked by R of its queries, every (T // R)-th back from its
    last one; with R >= T it is full rescoring."""
    q, k = rand_qk(L=150, seed=6)
    L, T, budget, R = 150, 16, 30, 4
    ends = [fixed_size_ends(L, 8)]
    full = OPTIONS.replace(token_rescore=100.0)  # every visible key a candidate: the ranking is the queries' alone
    sampled = dhsa_select(q, k, budget=budget, boundaries=ends, options=full.replace(rescore_queries=R))
    assert torch.equal(dhsa_select(q, k, budget=budget, boundaries=ends, options=full).key_index,
                       dhsa_select(q, k, budget=budget, boundaries=ends, options=full.replace(rescore_queries=T)).key_index)
    for tile in (3, 9):  # a full tile and the short last one (150 = 9 * 16 + 6)
        first, last = tile * T, min(L, (tile + 1) * T) - 1
        rows = sorted({max(first, last - i * (T // R)) for i in range(R)})
        for head in range(4):
            logits = q[0, head, rows] @ k[0, head // 2, : last + 1].T * 16 ** -0.5
            logits = logits.masked_fill(torch.arange(last + 1)[None] > torch.tensor(rows)[:, None], float("-inf"))
            weight = torch.log_softmax(logits, dim=-1).amax(0)
            weight[list(set(range(4)) | set(range(last + 1 - 8, last + 1)))] = float("inf")
            assert kept(sampled, head, tile) == set(torch.topk(weight, budget).indices.tolist())


@pytest.mark.parametrize("R", [1, 3, 8])
def test_budget_causality_and_full_budget_with_sampled_rescoring(R):
    q, k = rand_qk(L=130, seed=R)
    options = OPTIONS.replace(token_rescore=2.0, rescore_queries=R)
    idx = dhsa_select(q, k, budget=24, boundaries=[fixed_size_ends(130, 8)], options=options).key_index
    tile_last = torch.clamp(torch.arange(1, idx.shape[2] + 1) * 16, max=130) - 1
    assert ((idx >= 0).sum(-1) <= 24).all()
    assert not ((idx >= 0) & (idx > tile_last[None, None, :, None])).any()
    v = torch.randn_like(k)
    out = dhsa_attention(q, k, v, budget=130, query_chunk=16, token_rescore=2.0, rescore_queries=R,
                         sink_tokens=4, local_tokens=8)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_bad_rescore_queries():
    with pytest.raises(ValueError, match="rescore_queries"):
        SparseAttentionConfig(rescore_queries=-1).dhsa_options()


def test_rescore_window_keeps_the_chunk_top_and_rescores_the_margin():
    """rescore_window = C: a tile keeps its best N_b - C keys by chunk score (sinks and local window included) as
    the plain selection ranks them, and fills the last C slots with the best of the next token_rescore x C
    candidates by their softmax weight over those candidates (brute force on one tile). Sinks, window and both cuts
    fall between whole chunks, so that no tie among a chunk's keys decides what is kept."""
    q, k = rand_qk(L=200, seed=9)
    L, T, budget, C = 200, 16, 48, 16
    ends = [fixed_size_ends(L, 8)]
    base = OPTIONS.replace(dense_tail=0, sink_tokens=8, local_tokens=8)
    got = dhsa_select(q, k, budget=budget, boundaries=ends, options=base.replace(token_rescore=3.0, rescore_window=C))
    plain_keep = dhsa_select(q, k, budget=budget - C, boundaries=ends, options=base)
    wide = dhsa_select(q, k, budget=budget - C + 3 * C, boundaries=ends, options=base)
    tile = 11
    first, last = tile * T, (tile + 1) * T - 1
    for head in range(4):
        keep = kept(plain_keep, head, tile)
        assert keep <= kept(got, head, tile), "a key of the chunk ranking's top was dropped"
        others = sorted(kept(wide, head, tile) - keep)
        logits = q[0, head, first:last + 1] @ k[0, head // 2, others].T * 16 ** -0.5
        logits = logits.masked_fill(torch.tensor(others)[None] > torch.arange(first, last + 1)[:, None], float("-inf"))
        weight = torch.log_softmax(logits, dim=-1).amax(0)
        best = {others[i] for i in torch.topk(weight, C).indices.tolist()}
        assert kept(got, head, tile) == keep | best


@pytest.mark.parametrize("C", [8, 16, 1000])
def test_rescore_window_budget_causality_and_full_budget(C):
    q, k = rand_qk(L=130, seed=C)
    options = OPTIONS.replace(token_rescore=2.0, rescore_queries=4, rescore_window=C)
    idx = dhsa_select(q, k, budget=40, boundaries=[fixed_size_ends(130, 8)], options=options).key_index
    tile_last = torch.clamp(torch.arange(1, idx.shape[2] + 1) * 16, max=130) - 1
    counts = (idx >= 0).sum(-1)
    assert (counts <= 40).all() and (counts == torch.clamp(tile_last + 1, max=40)).all()
    assert not ((idx >= 0) & (idx > tile_last[None, None, :, None])).any()
    assert ((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all()
    v = torch.randn_like(k)
    out = dhsa_attention(q, k, v, budget=130, query_chunk=16, token_rescore=2.0, rescore_window=C,
                         sink_tokens=4, local_tokens=8)
    ref = dense_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="rescore_window"):
        SparseAttentionConfig(rescore_window=-1)
