"""The counting rules of flexprefill and xattention on hand-computed cases: the authors' code ("official", the
default) and the papers' rule ("paper"), worked out step by step below; the authors' adaptive mode (no cap) and
the matched-budget mode's refusal of budgets that leave no choice. (The equality of whole selections with the
authors' code was checked on their own functions, outside the test suite: README "Peers".)"""

import pytest
import torch

from utils.methods.baselines.threshold_blocks import BlockGrid, cover_mask, within_mask
from utils.methods.baselines.flexprefill import blocks_needed, flexprefill_blocks
from utils.methods.baselines.xattention import official_chunk_tiles, threshold_mask, xattention_blocks
from utils.config import SparseAttentionConfig
from utils.runs.records import LEGACY_VALUES
from utils.methods import METHODS, LayerContext


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ FlexPrefill

def test_within_mask_stops_before_the_entry_that_crosses():
    x = torch.tensor([[0.2, 0.5, 0.3]])
    assert within_mask(x, 0.6).tolist() == [[False, True, False]]     # 0.5 <= 0.6, 0.5 + 0.3 > 0.6
    assert cover_mask(x, 0.6).tolist() == [[False, True, True]]       # the paper's set reaches 0.6
    assert within_mask(x, 0.8).tolist() == [[False, True, True]]      # inclusive: 0.8 <= 0.8
    assert within_mask(x, 0.1).tolist() == [[False, False, False]]


# 8 tokens in blocks of 2; sorted cumulative sums 0.5, 0.75, 0.875, 0.9375, 1, 1, 1, 1 (exact in binary)
DISTRIBUTION = torch.tensor([0.0625, 0.5, 0.0, 0.125, 0.25, 0.0625, 0.0, 0.0])


@pytest.mark.parametrize("gamma, official, paper", [
    # official: t = #(cumsum <= gamma) + 1, t // 2 + 1 blocks with the forced one; paper: t = the fewest tokens
    # reaching gamma, ceil(t / 2) blocks besides the forced one
    (0.8, 2, 3),      # official: 2 sums <= 0.8, t = 3, 3 // 2 + 1 = 2; paper: 3 tokens reach 0.8, 2 + 1 = 3
    (0.75, 2, 2),     # official: 2 sums <= 0.75, t = 3 -> 2; paper: 2 tokens reach 0.75, 1 + 1 = 2
    (0.875, 3, 3),    # official: 3 sums, t = 4 -> 3; paper: 3 tokens, 2 + 1 = 3
    (0.4, 1, 2),      # official: no sum <= 0.4, t = 1 -> 1 (the forced block alone); paper: 1 token, 1 + 1 = 2
])
def test_flexprefill_counts(gamma, official, paper):
    assert int(blocks_needed(DISTRIBUTION, gamma, 2, "official")) == official
    assert int(blocks_needed(DISTRIBUTION, gamma, 2, "paper")) == paper


def test_flexprefill_counts_are_clamped_by_min_budget_and_the_block_count():
    assert int(blocks_needed(DISTRIBUTION, 0.4, 2, "official", min_blocks=3)) == 3
    # gamma 1: every sum <= 1, t = 9, 9 // 2 + 1 = 5 > the 4 blocks there are
    assert int(blocks_needed(DISTRIBUTION, 1.0, 2, "official")) == 4


def test_flexprefill_min_budget_gives_query_aware_heads_their_vertical_and_slash_blocks():
    q, k = rand(1, 2, 256, 16, seed=1), rand(1, 1, 256, 16, seed=2)
    plain, _, aware = flexprefill_blocks(q, k, None, 16, tau=1.0)                      # every head query-aware
    floor, _, _ = flexprefill_blocks(q, k, None, 16, tau=1.0, min_budget=64)           # + 4 vertical, 4 slash
    assert aware.all()
    sets = lambda b: [{x for x in row.tolist() if x >= 0} for row in b.flatten(0, 2)]
    assert all(a <= b for a, b in zip(sets(plain), sets(floor)))
    assert (floor >= 0).sum() > (plain >= 0).sum()


def test_flexprefill_adaptive_reads_short_sequences_densely():
    """The authors' rule: up to max(2 blocks, min_budget rounded up to blocks) keys, dense attention."""
    q, k = rand(1, 2, 80, 16, seed=3), rand(1, 1, 80, 16, seed=4)
    blocks, grid, _ = flexprefill_blocks(q, k, None, 16, min_budget=80)
    assert all((blocks[0, h, t] >= 0).sum() == t + 1 for h in range(2) for t in range(grid.n_tiles))
    blocks, grid, _ = flexprefill_blocks(q, k, None, 16, min_budget=0)                  # 80 > 2 blocks: sparse
    assert (blocks >= 0).sum() < 2 * sum(range(1, grid.n_tiles + 1))


# ------------------------------------------------------------------------------------------------ XAttention

def tile3_scores():
    """4 queries, 4 keys, blocks of 1: the last tile scores blocks 0..3 as 1/8, 3/8, 1/4, 1/4 (its diagonal)."""
    scores = torch.zeros(1, 1, 4, 4)
    scores[0, 0, 0, :1] = torch.tensor([1.0])
    scores[0, 0, 1, :2] = torch.tensor([0.5, 0.5])
    scores[0, 0, 2, :3] = torch.tensor([0.25, 0.5, 0.25])
    scores[0, 0, 3] = torch.tensor([0.125, 0.375, 0.25, 0.25])
    return scores, BlockGrid.make(4, 4, None, 1)


@pytest.mark.parametrize("threshold, official, paper", [
    # Their find_blocks_chunked on the last row: flags block 0 and the diagonal, then the diagonal's eye row
    # overwrites block 0's flag (current index 0), so only block 3 is forced. Sorted values with the forced sum
    # put first: [0, 0.25, 0.375, 0.25] (two slots assumed forced, the last two others dropped); index order
    # [3, 1, 2, 0]; cumulative sums without self [0, 0, 0.25, 0.625]; kept where < threshold; every other slot
    # is padded with index 0, so block 0 is set too.
    (0.25, {0, 1, 3}, {0, 3}),        # sums < 0.25: slots 0, 1 -> {3, 1} + 0; paper: 0 + 3 hold 0.375 >= 0.25
    (0.5, {0, 1, 2, 3}, {0, 1, 3}),   # sums < 0.5: slots 0, 1, 2 -> {3, 1, 2} + 0; paper: 0.375 < 0.5, + block 1
    (0.2, {0, 1, 3}, {0, 3}),         # slot 1 is always kept: 0 < 0.2
])
def test_xattention_rules_on_the_last_tile(threshold, official, paper):
    scores, grid = tile3_scores()
    for rule, want in (("official", official), ("paper", paper)):
        mask = threshold_mask(scores, grid, threshold, rule)[0, 0, 3]
        assert set(torch.nonzero(mask).flatten().tolist()) == want, rule


def test_xattention_official_rule_applies_to_their_first_query_chunk_only():
    assert official_chunk_tiles(BlockGrid.make(4096, 4096, None, 128)) == 32          # chunk 4096 >= L
    assert official_chunk_tiles(BlockGrid.make(32768, 32768, None, 128)) == 64        # chunk 2^28 / 2^15 = 8192
    assert official_chunk_tiles(BlockGrid.make(1024, 4096, None, 128)) == 0           # queries not from key 0
    # Queries after a prefix: their current index is > 0 and both flags stand: the paper's rule.
    scores, _ = tile3_scores()
    grid = BlockGrid.make(2, 4, None, 1)
    mask = threshold_mask(scores[:, :, 2:], grid, 0.25, "official")[0, 0, 1]
    assert set(torch.nonzero(mask).flatten().tolist()) == {0, 3}


# ------------------------------------------------------------------------------------------------ budget modes

@pytest.mark.parametrize("name", ["flexprefill", "xattention"])
def test_adaptive_is_the_default_and_has_no_cap(name):
    cfg = SparseAttentionConfig(method=name, density=0.125)
    assert (cfg.peer_budget, LEGACY_VALUES["peer_budget"]) == ("adaptive", "matched")
    q, k = rand(1, 4, 1024, 32, seed=5), rand(1, 2, 1024, 32, seed=6)
    selection = METHODS[name].select(q, k, cfg.replace(flex_min_budget=0), LayerContext())
    assert (selection.key_index >= 0).sum(-1).max() > 128     # some tile reads more than N_b = 128 keys


@pytest.mark.parametrize("name", ["flexprefill", "xattention"])
def test_matched_budget_refuses_two_blocks_per_tile(name):
    q, k = rand(1, 4, 2048, 16, seed=7), rand(1, 2, 2048, 16, seed=8)
    cfg = SparseAttentionConfig(method=name, density=0.125, peer_budget="matched")   # N_b = 256: 2 blocks
    with pytest.raises(ValueError, match=r"peer_budget='matched' keeps at most 2 block\(s\) of 128 keys .* "
                                         r"use --peer-budget adaptive"):
        METHODS[name].select(q, k, cfg, LayerContext())
    selection = METHODS[name].select(q, k, cfg.replace(density=0.1875), LayerContext())   # 384: 3 blocks
    assert (selection.key_index >= 0).sum(-1).max() <= 384
    full = METHODS[name].select(q, k, cfg.replace(density=1.0, block_size=1024), LayerContext())  # dense: allowed
    assert (full.key_index >= 0).sum(-1).max() == 2048
    blocks = flexprefill_blocks if name == "flexprefill" else xattention_blocks
    with pytest.raises(ValueError, match="peer_budget='matched'"):
        blocks(q, k, 200, 128)
