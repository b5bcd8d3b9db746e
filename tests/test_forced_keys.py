"""Always-kept (forced) keys of DHSA: the local window takes at most half of N_b and the sinks at most half of the
rest, so the chunk scores always choose at least a quarter (the authors' 128 + 128 would otherwise fill a small
budget entirely)."""

import pytest
import torch

from utils.methods.dhsa.boundaries import fixed_size_ends
from utils.config import DHSAOptions
from utils.methods.dhsa.select import dhsa_select
from utils.methods.dhsa.scores import forced_key_counts

L, D, T, BUDGET = 256, 16, 16, 40


def planted(strong: slice, seed=0):
    """One head; the last tile's queries point at the keys of `strong` (a 16-key chunk), all other keys are noise."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g)
    k = 0.1 * torch.randn(1, 1, L, D, generator=g)
    k[0, 0, strong] += 3 * direction
    q = 0.1 * torch.randn(1, 1, L, D, generator=g)
    q[0, 0, -T:] += direction
    return q, k


def last_tile_keys(q, k, **forced):
    sel = dhsa_select(q, k, budget=BUDGET, boundaries=[fixed_size_ends(L, 16)],
                      options=DHSAOptions(query_chunk=T, **forced))
    row = sel.key_index[0, 0, -1]
    return set(row[row >= 0].tolist())


def test_forced_counts_take_at_most_half_the_budget():
    budget = torch.tensor([1, 2, 7, 40, 1000])
    for sink_tokens, local_tokens in ((0, 0), (4, 0), (0, 100), (100, 0), (100, 100), (64, 128)):
        sink, local = forced_key_counts(budget, sink_tokens, local_tokens)
        assert (local <= budget // 2).all() and (local <= local_tokens).all()
        assert (sink <= torch.clamp((budget - local) // 2, min=1)).all() and (sink <= sink_tokens).all()
        assert (sink + local <= budget).all()
        if sink_tokens:  # key 0 always kept, so every query reads something
            assert (sink >= 1).all()
    sink, local = forced_key_counts(torch.tensor([1000]), 64, 128)
    assert (sink.item(), local.item()) == (64, 128)  # a large budget keeps them all


def test_a_large_local_window_leaves_half_the_budget_to_the_chunk_scores():
    q, k = planted(slice(32, 48))
    kept = last_tile_keys(q, k, sink_tokens=0, local_tokens=100)
    assert len(kept) == BUDGET
    assert set(range(L - BUDGET // 2, L)) <= kept          # the local window, capped at N_b / 2 = 20 keys
    assert set(range(32, 48)) <= kept                       # the planted chunk, chosen by its score
    assert not set(range(L - BUDGET, L - BUDGET // 2)) & kept - set(range(32, 48))  # no more local keys than that


def test_many_sinks_leave_half_the_budget_to_the_chunk_scores():
    q, k = planted(slice(160, 176))
    kept = last_tile_keys(q, k, sink_tokens=100, local_tokens=0)
    assert len(kept) == BUDGET
    assert set(range(BUDGET // 2)) <= kept                  # sinks, capped at N_b / 2 = 20 keys (no local keys)
    assert set(range(160, 176)) <= kept
    assert not set(range(BUDGET // 2, BUDGET)) & kept


@pytest.mark.parametrize("sink_tokens, local_tokens", [(4, 8), (64, 128)])
def test_default_sized_forced_keys_are_all_kept_when_the_budget_allows(sink_tokens, local_tokens):
    q, k = planted(slice(32, 48))
    sel = dhsa_select(q, k, budget=400, boundaries=[fixed_size_ends(L, 16)],
                      options=DHSAOptions(query_chunk=T, sink_tokens=sink_tokens, local_tokens=local_tokens))
    for t in range(sel.key_index.shape[2]):
        end = min(L, (t + 1) * T)
        row = set(sel.key_index[0, 0, t][sel.key_index[0, 0, t] >= 0].tolist())
        assert set(range(min(sink_tokens, end))) <= row
        assert set(range(max(0, end - local_tokens), end)) <= row
