"""flexprefill and xattention (utils/methods/baselines/flexprefill.py, xattention.py, threshold_blocks.py) beyond the registry-wide
checks of test_baselines.py: their scores against brute-force loops, planted attention patterns they must find
(a vertical line, a slash line, query-dependent blocks), their thresholds (more kept as they rise), the density
they report, and the block-number form the GPU block kernel reads."""

import math

import pytest
import torch

from utils.attention import sparse_attention
from utils.methods.baselines.threshold_blocks import (REACHED, BlockGrid, block_selection, cover_mask, keep_blocks, reached,
                                    reached_density, token_selection)
from utils.methods.baselines.flexprefill import flexprefill_blocks, sqrt_js_divergence
from utils.methods.baselines.oracle import last_query_attention
from utils.methods.baselines.xattention import antidiagonal_block_scores, xattention_blocks
from utils.config import SparseAttentionConfig
from utils.methods import METHODS, LayerContext
from utils.selection import block_selection_to_tokens

PEERS = ["flexprefill", "xattention"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def config(name, budget, **options):
    """A matched budget (budget None: the authors' adaptive mode), blocks of 16, FlexPrefill without a floor."""
    values = dict(peer_budget="matched" if budget else "adaptive", flex_min_budget=0)
    values.update(options)
    return SparseAttentionConfig(method=name, budget=budget, density=None if budget else 0.125, block_size=16,
                                 **values)


def kept(blocks, tile, head=0):
    return {b for b in blocks[0, head, tile].tolist() if b >= 0}


def read_count(q, k, selection):
    """Keys each query reads, [B, Hq, Lq], counted on the executor's output with one-hot values."""
    B, Hkv, Lk, _ = k.shape
    eye = torch.eye(Lk).expand(B, Hkv, Lk, Lk).contiguous()
    return (sparse_attention(q, k, eye, selection) > 0).sum(-1)


# ------------------------------------------------------------------------------------------------ shared

def test_cover_mask_keeps_the_fewest_largest_entries_reaching_the_fraction():
    x = torch.tensor([[0.2, 0.5, 0.3]])
    assert cover_mask(x, 0.5).tolist() == [[False, True, False]]          # 0.5 reaches exactly half
    assert cover_mask(x, 0.6).tolist() == [[False, True, True]]
    assert cover_mask(x, 1.0).tolist() == [[True, True, True]]
    first = torch.tensor([[True, False, False]])                          # always-kept entries count first
    assert cover_mask(x, 0.6, first=first).tolist() == [[True, True, False]]


def test_keep_blocks_caps_each_tile_and_keeps_first_block_and_diagonal_first():
    grid = BlockGrid.make(64, 64, budget=24, block_size=8)                # 3 blocks per tile
    rank = torch.arange(8.0).expand(1, 1, 8, 8).clone()                   # later blocks rank higher
    blocks = keep_blocks(rank, grid)
    assert kept(blocks, 2) == {0, 1, 2}                                   # last + 1 = 24 <= N_b: dense
    for tile in range(3, 8):
        assert kept(blocks, tile) == {0, tile - 1, tile}                  # forced 0 and diagonal + best visible
    one = keep_blocks(rank, BlockGrid.make(64, 64, budget=15, block_size=8))   # 1 block: the diagonal only
    assert all(kept(one, t) == {t} for t in range(2, 8))
    nothing = torch.full((1, 1, 8, 8), float("-inf"))                     # nothing wanted: the forced blocks
    assert kept(keep_blocks(nothing, grid), 6) == {0, 6}


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("Lq, Lk, budget", [(200, 200, 64), (120, 200, 48), (97, 97, 50), (1, 150, 48),
                                             (200, 200, None), (120, 200, None)])
def test_reported_density_is_what_the_executor_reads(name, Lq, Lk, budget):
    q, k = rand(2, 4, Lq, 16), rand(2, 2, Lk, 16, seed=1)
    context = LayerContext()
    selection = METHODS[name].select(q, k, config(name, budget), context)
    counts = read_count(q, k, selection).double()
    if Lq == 1:  # decode steps record nothing
        assert REACHED not in context.state
        return
    record = context.state[REACHED]
    assert float(record["keys_read"]) == pytest.approx(counts.mean().item())
    assert float(record["density"]) == pytest.approx(counts.mean().item() / Lk)
    visible = (Lk - Lq + torch.arange(1, Lq + 1)).double()
    assert float(record["causal_fraction"]) == pytest.approx((counts.sum(-1) / visible.sum()).mean().item())
    assert budget is None or counts.max() <= budget


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("Lq, Lk", [(256, 256), (200, 264), (300, 300)])
def test_block_form_reads_the_same_keys_as_token_lists(name, Lq, Lk):
    """The block-number form (GPU block kernel) and the token lists describe the same reads."""
    q, k = rand(1, 4, Lq, 16, seed=2), rand(1, 2, Lk, 16, seed=3)
    blocks, grid = (flexprefill_blocks(q, k, 80, 16)[:2] if name == "flexprefill"
                    else xattention_blocks(q, k, 80, 16, stride=4))
    tokens, block_form = token_selection(blocks, grid), block_selection(blocks, grid)
    assert block_form.block_size == 16 and tokens.key_index.shape[-1] <= 80
    assert torch.equal(block_selection_to_tokens(block_form, Lk).mask(Lq, Lk), tokens.mask(Lq, Lk))
    assert torch.equal(tokens.counts, (tokens.key_index >= 0).sum(-1, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 16"):
        block_selection(*flexprefill_blocks(q, k, 80, 12)[:2])


@pytest.mark.parametrize("name", PEERS)
def test_patched_qwen2_records_its_density(name):
    from utils.models import tiny_model
    from utils.patch import patch_model

    model = tiny_model("qwen2")
    ids = torch.randint(3, 300, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        patch_model(model, method=name, density=1.0, block_size=16, peer_budget="matched")
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-4, rtol=1e-4)
        assert reached_density(model)["density"] == pytest.approx(97 / 2 / 96)   # dense: (L + 1) / 2 keys
        patch_model(model, method=name, budget=48, block_size=16, peer_budget="matched")
        assert torch.isfinite(model(ids).logits).all()
        record = reached_density(model)
        patch_model(model, method="dense")
    assert 0 < record["keys_read"] <= 48 and record["density"] == pytest.approx(record["keys_read"] / 96)
    assert reached_density(model) is None                # the dense patch dropped the layers' contexts


def test_reached_density_averages_the_layers():
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Module(), torch.nn.Module()
    model.a.sparse_context = LayerContext(0, {REACHED: {"density": torch.tensor(0.2)}})
    model.b.sparse_context = LayerContext(1, {REACHED: {"density": torch.tensor(0.4)}})
    assert reached_density(model) == {"density": pytest.approx(0.3)}
    assert reached_density(torch.nn.Linear(2, 2)) is None


def test_threshold_options_are_validated():
    for bad in (dict(flex_gamma=0.0), dict(flex_gamma=1.5), dict(xattn_threshold=0.0), dict(flex_tau=-0.1),
                dict(xattn_stride=0)):
        with pytest.raises(ValueError):
            SparseAttentionConfig(method="flexprefill", **bad)


# ------------------------------------------------------------------------------------------------ planted patterns

L, D, BS = 256, 64, 16


def slash_inputs(distance, scale=4.0, seed=0):
    """Query i is key i - distance, scaled: its attention sits on that one key."""
    k = rand(1, 1, L, D, seed=seed)
    q = rand(1, 1, L, D, seed=seed + 1)
    q[0, 0, distance:] = scale * k[0, 0, :L - distance]
    return q, k


def vertical_inputs(column, scale=4.0, seed=0):
    """Every query from `column` on is key `column`, scaled: a vertical line."""
    k = rand(1, 1, L, D, seed=seed)
    q = rand(1, 1, L, D, seed=seed + 1)
    q[0, 0, column:] = scale * k[0, 0, column]
    return q, k


def block_inputs(seed=0):
    """Tile t's queries look at the keys of block target[t] (a different direction per tile): neither vertical
    nor slash, but mean-pooled queries and keys see it. Returns q, k, target."""
    g = torch.Generator().manual_seed(seed)
    n = L // BS
    directions = torch.randn(n, D, generator=g)
    k = 0.3 * torch.randn(1, 1, L, D, generator=g)
    q = 0.3 * torch.randn(1, 1, L, D, generator=g)
    target, used = {}, set()
    for t in range(3, n):
        choices = [b for b in range(1, t) if b not in used]
        target[t] = choices[int(torch.randint(len(choices), (1,), generator=g))]
        used.add(target[t])
        k[0, 0, target[t] * BS:(target[t] + 1) * BS] += directions[t]
        q[0, 0, t * BS:(t + 1) * BS] += directions[t]
    return q, k, target


def sparse_tiles(grid):
    return [t for t in range(grid.n_tiles) if not bool(grid.dense()[t])]


# A planted line holds gamma of the attention in a few tokens: the official count (tokens // block + 1, the
# forced block included) is then the forced block alone, and the authors' floor min_budget finds the line; the
# paper's count (ceil(tokens / block) besides the forced block) finds it without a floor.
FINDERS = [dict(rule="official", min_budget=2 * BS), dict(rule="paper")]


@pytest.mark.parametrize("distance", [37, 70])
@pytest.mark.parametrize("options", FINDERS)
def test_flexprefill_finds_a_slash_line(distance, options):
    q, k = slash_inputs(distance)
    blocks, grid, aware = flexprefill_blocks(q, k, budget=64, block_size=BS, **options)
    assert not aware.any()                               # mean-pooled blocks cannot see a line: vertical-slash
    offset = distance // BS                              # the block diagonal holding most of the line
    for t in sparse_tiles(grid):
        if t - offset >= 0:
            assert t - offset in kept(blocks, t), (t, kept(blocks, t))
    adaptive, grid, _ = flexprefill_blocks(q, k, block_size=BS, **options)   # no cap: the same line
    assert all(t - offset in kept(adaptive, t) for t in range(offset, grid.n_tiles))


def test_flexprefill_official_count_without_floor_keeps_the_forced_blocks_only():
    q, k = slash_inputs(37)
    blocks, grid, _ = flexprefill_blocks(q, k, block_size=BS, rule="official", min_budget=0)
    assert all(kept(blocks, t) == {0, t} for t in range(1, grid.n_tiles))


def test_flexprefill_and_xattention_find_a_vertical_line():
    q, k = vertical_inputs(150)
    for blocks, grid in (flexprefill_blocks(q, k, 48, BS, min_budget=2 * BS)[:2],
                         flexprefill_blocks(q, k, 48, BS, rule="paper")[:2],
                         xattention_blocks(q, k, 48, BS, stride=4)):
        for t in sparse_tiles(grid):
            if t > 150 // BS:
                assert 150 // BS in kept(blocks, t)


def test_flexprefill_query_aware_head_finds_query_dependent_blocks():
    q, k, target = block_inputs()
    blocks, grid, aware = flexprefill_blocks(q, k, budget=48, block_size=BS)
    assert aware.all()
    assert all(target[t] in kept(blocks, t) for t in sparse_tiles(grid))
    # The same head forced to vertical-slash (tau = 0) keeps the last tile's target for every tile instead.
    blocks, grid, aware = flexprefill_blocks(q, k, budget=48, block_size=BS, tau=0.0)
    assert not aware.any()
    assert sum(target[t] in kept(blocks, t) for t in sparse_tiles(grid)) < len(sparse_tiles(grid)) // 2


@pytest.mark.parametrize("distance", [37, 71])
def test_xattention_finds_a_slash_line(distance):
    """An odd distance: with an even stride, an antidiagonal of an S x S square crosses the lines at odd offsets
    inside the square (a line at an even distance never meets the antidiagonals: that is the estimator)."""
    q, k = slash_inputs(distance)
    blocks, grid = xattention_blocks(q, k, budget=64, block_size=BS, stride=4)
    for t in sparse_tiles(grid):
        line = [t * BS + r - distance for r in range(BS) if t * BS + r >= distance]
        want = {key // BS for key in line} - {t}                              # blocks holding the line
        assert want <= kept(blocks, t), (t, want, kept(blocks, t))


def test_xattention_finds_query_dependent_blocks():
    q, k, target = block_inputs()
    blocks, grid = xattention_blocks(q, k, budget=48, block_size=BS, stride=8)
    assert all(target[t] in kept(blocks, t) for t in sparse_tiles(grid))


# ------------------------------------------------------------------------------------------------ thresholds

def blocks_per_tile(blocks):
    return (blocks >= 0).sum(-1)


def test_higher_gamma_keeps_more():
    q, k = rand(1, 4, 512, 32, seed=5), rand(1, 2, 512, 32, seed=6)
    counts, reads = [], []
    for gamma in (0.3, 0.6, 0.9, 1.0):
        blocks, grid, _ = flexprefill_blocks(q, k, budget=256, block_size=16, gamma=gamma)
        counts.append(blocks_per_tile(blocks))
        reads.append(float(reached(blocks, grid)["keys_read"]))
    for low, high in zip(counts, counts[1:]):
        assert (low <= high).all()
    assert reads[0] < reads[1] < reads[2] <= reads[3]
    assert counts[-1][..., -1].eq(16).all()              # gamma = 1 fills the cap on the last tile


def test_tau_switches_the_pattern():
    q, k = rand(1, 4, 300, 32, seed=7), rand(1, 2, 300, 32, seed=8)
    assert not flexprefill_blocks(q, k, 64, 16, tau=0.0)[2].any()
    assert flexprefill_blocks(q, k, 64, 16, tau=1.0)[2].all()          # sqrt(JS) <= sqrt(ln 2) < 1


def test_higher_xattention_threshold_keeps_more():
    q, k = rand(1, 4, 512, 32, seed=9), rand(1, 2, 512, 32, seed=10)
    counts, reads = [], []
    for threshold in (0.3, 0.6, 0.9, 1.0):
        blocks, grid = xattention_blocks(q, k, budget=256, block_size=16, threshold=threshold, stride=4)
        counts.append(blocks_per_tile(blocks))
        reads.append(float(reached(blocks, grid)["keys_read"]))
    for low, high in zip(counts, counts[1:]):
        assert (low <= high).all()
    assert reads[0] < reads[1] < reads[2] <= reads[3]
    assert counts[-1][..., -1].eq(16).all()


# ------------------------------------------------------------------------------------------------ estimators

def test_last_query_attention_matches_loops():
    B, Hq, Hkv, Lq, Lk, Dh, m = 1, 4, 2, 30, 45, 8, 7
    q, k = rand(B, Hq, Lq, Dh, seed=11), rand(B, Hkv, Lk, Dh, seed=12)
    vertical, slash = last_query_attention(q, k, m)
    kk = k.repeat_interleave(Hq // Hkv, 1)
    want_v, want_s = torch.zeros(B, Hq, Lk), torch.zeros(B, Hq, Lk)
    for i in range(Lq - m, Lq):
        pos = Lk - Lq + i
        p = torch.softmax(torch.einsum("bhd,bhjd->bhj", q[:, :, i], kk[:, :, :pos + 1]) / math.sqrt(Dh), dim=-1)
        want_v[..., :pos + 1] += p / m
        for j in range(pos + 1):
            want_s[..., pos - j] += p[..., j] / m
    torch.testing.assert_close(vertical, want_v)
    torch.testing.assert_close(slash, want_s)


def test_sqrt_js_divergence_bounds():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert float(sqrt_js_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)
    assert float(sqrt_js_divergence(p, p.flip(0))) == pytest.approx(math.sqrt(math.log(2)))


def test_antidiagonal_scores_match_loops():
    B, Hq, Hkv, Lq, Lk, Dh, S, size = 1, 4, 2, 30, 40, 8, 4, 8
    q, k = rand(B, Hq, Lq, Dh, seed=13), rand(B, Hkv, Lk, Dh, seed=14)
    grid = BlockGrid.make(Lq, Lk, 16, size)
    got = antidiagonal_block_scores(q, k, grid, S)
    kk = k.repeat_interleave(Hq // Hkv, 1)
    n_qg, n_kg = grid.n_tiles * size // S, grid.n_blocks * size // S
    want = torch.zeros(B, Hq, grid.n_tiles, grid.n_blocks)
    for a in range(n_qg):
        if a * S >= Lq:
            continue
        last = min(Lk - Lq + a * S + S - 1, Lk - 1)
        logits = torch.full((B, Hq, n_kg), float("-inf"))
        for b in range(n_kg):
            if b * S > last:
                continue
            total = torch.zeros(B, Hq)
            for t in range(S):
                i, j = a * S + S - 1 - t, b * S + t
                if i < Lq and j < Lk:
                    total += (q[:, :, i] * kk[:, :, j]).sum(-1)
            logits[..., b] = total / math.sqrt(Dh) / S
        p = torch.softmax(logits, -1)
        for b in range(n_kg):
            want[:, :, a * S // size, b * S // size] += p[..., b]
    torch.testing.assert_close(got, want)
    groups = torch.clamp(Lq - torch.arange(grid.n_tiles) * size, max=size).div(S).ceil()
    torch.testing.assert_close(got.sum(-1), groups.expand(B, Hq, -1).float())   # each real group adds 1


def test_no_length_squared_memory(rss_growth_mib):
    """16K tokens: an L x L fp32 score matrix needs 1 GiB; the estimators work on blocks, groups and the last
    queries only."""
    grown_mib = rss_growth_mib(
        "import torch\n"
        "from utils.attention import sparse_attention\n"
        "from utils.config import SparseAttentionConfig\n"
        "from utils.methods import METHODS, LayerContext\n"
        "q = torch.randn(1, 2, 16384, 16); k = torch.randn(1, 1, 16384, 16); v = torch.randn(1, 1, 16384, 16)",
        "for name in ('flexprefill', 'xattention'):\n"
        "    for budget in (64, 1024):\n"
        "        cfg = SparseAttentionConfig(method=name, budget=budget)\n"
        "        sparse_attention(q, k, v, METHODS[name].select(q, k, cfg, LayerContext()))")
    assert grown_mib < 600, f"peak memory grew by {grown_mib} MiB"


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("L", [128, 130])  # a whole number of blocks (nothing to pad), and not
def test_transformers_layout_gives_the_same_selection(name, L):
    """Models hand over q/k as [B, L, H, D] tensors viewed as [B, H, L, D] (not contiguous)."""
    q, k = rand(1, L, 4, 16, seed=15), rand(1, L, 2, 16, seed=16)
    cfg = config(name, 48)
    strided = METHODS[name].select(q.transpose(1, 2), k.transpose(1, 2), cfg, LayerContext())
    packed = METHODS[name].select(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), cfg, LayerContext())
    assert torch.equal(strided.key_index, packed.key_index)
