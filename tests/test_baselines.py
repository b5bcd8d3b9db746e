"""Every sparse method of the registry (baselines of utils/baselines and the DHSA variants) on random inputs:
per-query budget, causality, dense at full budget, decode, the oracle bound on recall, the DHSA -> block_sparse
reduction, the baselines' own patterns, and whole-model patching. Methods are taken from `METHODS`, so a new
method is covered as soon as it is registered (opt out of "dense at full budget" explicitly below)."""

import math

import pytest
import torch

from run_attention_recall import main as recall_main
from utils.attention import dense_attention, sparse_attention
from utils.methods.baselines.quest import page_bounds
from utils.methods.baselines.streaming import window_offsets
from utils.methods.baselines.vertical_slash import estimate_pattern
from utils.config import SparseAttentionConfig
from utils.methods import METHODS, LayerContext, run_method
from utils.bench.recall import kept_mask, layer_recall, read_keys, recall_scores, topk_thresholds, true_attention

SPARSE = [name for name, method in METHODS.items() if method.select is not None]
ISSUE_METHODS = ["streaming", "streaming_dilated", "streaming_strided", "vertical_slash", "block_sparse", "quest",
                 "oracle_topk", "dhsa_no_robust_repr", "dhsa_fixed_chunks"]
# Dilated windows skip every other key by design, so even a full budget is not dense attention.
NOT_DENSE_AT_FULL_BUDGET = {"streaming_dilated", "streaming_strided"}
DENSE_AT_FULL_BUDGET = [name for name in SPARSE if name not in NOT_DENSE_AT_FULL_BUDGET]
# FlexPrefill and XAttention run without a budget by default (the authors' adaptive density): the budget contract
# is checked on their matched mode, with 4-key blocks; it refuses budgets leaving <= 2 blocks per tile (< 12 keys).
PEERS = {"flexprefill", "xattention"}
PEER_OPTIONS = dict(peer_budget="matched", flex_min_budget=0, block_size=4)


def refused(name, budget):
    return name in PEERS and budget is not None and budget < 3 * PEER_OPTIONS["block_size"]

SHAPES = [  # B, Hq, Hkv, L, D
    (1, 4, 4, 97, 16),    # MHA, L not a multiple of tiles, blocks or pages
    (2, 4, 2, 130, 8),    # GQA 2:1, batch
    (1, 6, 2, 64, 16),    # GQA 3:1
]


def rand_qkv(B, Hq, Hkv, L, D, seed=0, Lq=None):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq or L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g))


def small_config(name, budget=None, **options):
    """Small tiles, blocks and pages so that short random sequences exercise every code path."""
    values = dict(method=name, budget=budget, density=None if budget else 1.0, query_chunk=16, block_size=16,
                  page_size=4, last_q=8, chunk_size=8, dense_tail=16)  # DHSA: a one-tile question tail
    if name in PEERS:
        values.update(PEER_OPTIONS)
    values.update(options)
    return SparseAttentionConfig(**values)


def select(name, q, k, budget=None, context=None, **options):
    return METHODS[name].select(q, k, small_config(name, budget, **options), context or LayerContext())


def weights_read(q, k, selection):
    """Attention weights [B, Hq, Lq, Lk] the executor gives a selection, read out through one-hot values."""
    B, Hkv, Lk, _ = k.shape
    eye = torch.eye(Lk, dtype=q.dtype).expand(B, Hkv, Lk, Lk).contiguous()
    return sparse_attention(q, k, eye, selection)


def dense_reference(q, k, v):
    G = q.shape[1] // k.shape[1]
    return dense_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))


def masked_attention(q, k, v, selection, *, scale=None, softcap=None):
    """Reference for the executor: plain softmax attention over the (query, key) pairs of `selection.mask`
    (an Lq x Lk mask, so small inputs only); a query that reads nothing gets 0. Same signature as
    utils.attention.sparse_attention."""
    Hq, Lq, D = q.shape[1], q.shape[2], q.shape[3]
    mask = selection.mask(Lq, k.shape[2])
    mask = mask.repeat_interleave(Hq // mask.shape[1], dim=1)
    G = Hq // k.shape[1]
    scores = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (weights @ v.double().repeat_interleave(G, 1)).to(q.dtype)


def test_issue_methods_are_registered():
    for name in ISSUE_METHODS:
        assert name in METHODS and METHODS[name].summary
    assert METHODS["quest"].dense_prefill and not METHODS["streaming"].dense_prefill


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [1, 5, 24, 50])
def test_budget_causality_and_masks(name, shape, budget):
    q, k, _ = rand_qkv(*shape, seed=budget)
    B, Hq, L = shape[0], shape[1], shape[3]
    if refused(name, budget):
        with pytest.raises(ValueError, match="peer_budget='matched' keeps at most 1 block"):
            select(name, q, k, budget)
        return
    selection = select(name, q, k, budget)
    w = weights_read(q, k, selection)
    read = w > 0
    s = selection.budget_rows(L)  # the queries after s (DHSA's dense question tail) read every key before them
    assert not torch.triu(read, diagonal=1).any(), "a query read a future key"
    assert read[:, :, :s].sum(-1).le(budget).all(), "a query read more keys than its budget"
    assert torch.equal(read[:, :, s:], torch.ones(L, L, dtype=torch.bool).tril()[s:].expand_as(read[:, :, s:]))
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # every query reads at least one key
    # The mask of the selection and the recall script's per-query key lists describe what the executor reads.
    assert torch.equal(kept_mask(selection, L, L, Hq), read)
    keys, valid = read_keys(selection, torch.arange(s))
    listed = torch.zeros(B, keys.shape[1], s, L + 1, dtype=torch.bool)
    listed.scatter_(-1, torch.where(valid, keys, L), True)
    assert torch.equal(listed[..., :L].repeat_interleave(Hq // keys.shape[1], dim=1), read[:, :, :s])


@pytest.mark.parametrize("name", DENSE_AT_FULL_BUDGET)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_budget_equals_dense(name, shape):
    q, k, v = rand_qkv(*shape, seed=1)
    L = shape[3]
    ref = dense_reference(q, k, v)
    for selection in (select(name, q, k, L), select(name, q, k, None)):  # budget = L, and density = 1.0
        torch.testing.assert_close(sparse_attention(q, k, v, selection), ref, atol=2e-6, rtol=1e-5)
    out = run_method(METHODS[name], q, k, v, small_config(name, L), LayerContext())
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SPARSE)
def test_decode_step_reads_at_most_budget(name):
    """A decode step after a prefill in the same layer context (methods may keep state), and without one; its
    output is exact attention on every key with decode="dense", on the keys it selects with decode="sparse"
    (quest acts only at decode: always sparse)."""
    B, Hq, Hkv, L, D = 2, 4, 2, 120, 16
    q, k, v = rand_qkv(B, Hq, Hkv, L + 3, D, seed=4)
    context = LayerContext()
    prefill = select(name, q[:, :, :L], k[:, :, :L], 20, context)
    read = weights_read(q[:, :, :L], k[:, :, :L], prefill).gt(0)[:, :, :prefill.budget_rows(L)]
    assert read.sum(-1).max() <= 20
    for step in range(L, L + 3):  # three generated tokens
        for ctx in (context, LayerContext()):
            selection = select(name, q[:, :, step:step + 1], k[:, :, :step + 1], 20, ctx)
            read = weights_read(q[:, :, step:step + 1], k[:, :, :step + 1], selection) > 0
            assert read.shape == (B, Hq, 1, step + 1)
            assert 1 <= read.sum(-1).min() and read.sum(-1).max() <= 20
    step = L + 2
    for decode in ("dense", "sparse"):
        config = small_config(name, 20, decode=decode)
        out = run_method(METHODS[name], q[:, :, step:], k, v, config, context)
        if config.decode == "dense":
            expected = dense_reference(q, k, v)[:, :, step:]
        else:
            expected = masked_attention(q[:, :, step:], k, v, select(name, q[:, :, step:], k, 20, context))
        assert out.shape == (B, Hq, 1, D)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert not torch.equal(masked_attention(q[:, :, step:], k, v, select(name, q[:, :, step:], k, 20, context)),
                           dense_reference(q, k, v)[:, :, step:])  # 20 of 123 keys: sparse differs from dense


@pytest.mark.parametrize("name", DENSE_AT_FULL_BUDGET)
def test_decode_step_at_full_budget_is_dense(name):
    q, k, v = rand_qkv(1, 4, 2, 90, 16, seed=5)
    context = LayerContext()
    select(name, q[:, :, :89], k[:, :, :89], 90, context)  # prefill of 89 tokens, then the 90th is decoded
    out = run_method(METHODS[name], q[:, :, -1:], k, v, small_config(name, 90), context)
    torch.testing.assert_close(out, dense_reference(q, k, v)[:, :, -1:], atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ recall

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [4, 24])
def test_oracle_recall_is_one_and_bounds_every_method(shape, budget):
    q, k, _ = rand_qkv(*shape, seed=6)
    L = shape[3]
    logits, probs = true_attention(q, k)
    threshold = topk_thresholds(logits, [budget])[budget]
    scores = {}
    rows = {}
    for name in (name for name in SPARSE if not refused(name, budget)):
        selection = select(name, q, k, budget)
        rows[name] = selection.budget_rows(L)  # a dense question tail reads more than the budget: not bounded
        keys, valid = read_keys(selection, torch.arange(L))
        scores[name] = recall_scores(logits, probs, keys, valid, threshold, budget)
    oracle = scores["oracle_topk"]
    assert torch.equal(oracle["topk_overlap"], torch.ones_like(oracle["topk_overlap"]))
    torch.testing.assert_close(oracle["mass_recall"], probs.topk(budget, -1).values.sum(-1))
    assert min(rows.values()) < L  # the DHSA variants have a dense tail by default
    for name, s in scores.items():
        n = rows[name]
        assert (s["mass_recall"][..., :n] <= oracle["mass_recall"][..., :n] + 1e-5).all(), name
        assert (s["topk_overlap"] <= 1).all() and (s["keys_read"][..., :n] <= budget).all(), name


def test_oracle_keeps_the_true_top_keys():
    q, k, _ = rand_qkv(1, 4, 2, 70, 8, seed=7)
    selection = select("oracle_topk", q, k, 9)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)).masked_fill(torch.ones(70, 70).triu(1).bool(), -1e9)
    want = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(9, -1).indices, True)
    want &= torch.ones(70, 70).tril().bool()
    assert torch.equal(kept_mask(selection, 70, 70, 4), want)


def test_layer_recall_rows():
    q, k, _ = rand_qkv(1, 4, 2, 96, 16, seed=8)
    config = small_config("oracle_topk", 8, dense_tail=0)  # no dense question tail: every row within its budget
    rows = layer_recall(q[:, :, 32:], k, {}, ["oracle_topk", "streaming", "dhsa"], [8, 32], 48, config, 0, {}, None,
                        query_step=20)
    assert len(rows) == 6
    for row in rows:
        assert 0 < row["mass_recall"] <= 1 and 0 < row["topk_overlap"] <= 1 and row["keys_read"] <= row["kept_keys"]
        if row["method"] == "oracle_topk":
            assert row["topk_overlap"] == pytest.approx(1.0) and row["keys_read"] == row["kept_keys"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method"), (["--methods", "dense"], "recall 1"),
    (["--lengths", "100"], "fewer tokens"), (["--kept-keys", "0"], "positive"),
])
def test_recall_cli_rejects_bad_input_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        recall_main(argv)


# ------------------------------------------------------------------------------------------------ DHSA

@pytest.mark.parametrize("shape", [(1, 4, 2, 1024, 16), (2, 4, 4, 768, 8), (1, 6, 2, 1280, 16)])
@pytest.mark.parametrize("budget", [384, 512, 640, 1024])
def test_dhsa_without_dynamic_chunks_and_robust_repr_is_block_sparse(shape, budget):
    """Paper §4 / Table 4: removing both contributions reduces DHSA to block-sparse attention."""
    q, k, v = rand_qkv(*shape, seed=budget)
    dhsa = METHODS["dhsa_no_robust_repr"].select(
        q, k, SparseAttentionConfig(method="dhsa_no_robust_repr", budget=budget, chunk_size=128, query_chunk=128,
                                  query_pooling="mean", head_pooling="mean", sink_tokens=128, local_tokens=128,
                                  dense_tail=0, token_rescore=0),
        LayerContext())  # no boundary source in the context: uniform chunks of chunk_size
    block = METHODS["block_sparse"].select(
        q, k, SparseAttentionConfig(method="block_sparse", budget=budget, block_size=128), LayerContext())
    assert torch.equal(dhsa.key_index, block.key_index) and dhsa.query_chunk == block.query_chunk
    torch.testing.assert_close(sparse_attention(q, k, v, dhsa), sparse_attention(q, k, v, block))


# ------------------------------------------------------------------------------------------------ patterns

def keys_of(selection, L, query, head=0, num_queries=None):
    """Keys read by one query (index into the selection's queries) of one selection head, batch item 0."""
    mask = kept_mask(selection, num_queries or L, L, selection.key_index.shape[1])
    return mask[0, head, query].nonzero().flatten().tolist()


def test_streaming_keeps_sinks_and_a_window():
    q, k, _ = rand_qkv(1, 2, 1, 80, 8)
    sel = select("streaming", q, k, 20)  # 4 sinks (20%) + 16 local keys
    assert keys_of(sel, 80, 79) == list(range(4)) + list(range(64, 80))
    assert keys_of(sel, 80, 10) == list(range(11))
    dilated = select("streaming_dilated", q, k, 20)
    assert keys_of(dilated, 80, 79) == list(range(4)) + list(range(49, 80, 2))
    strided = select("streaming_strided", q, k, 20)  # 4 sinks, 8 local, 8 dilated behind them
    assert keys_of(strided, 80, 79) == list(range(4)) + list(range(56, 71, 2)) + list(range(72, 80))
    assert window_offsets("dilated", 3).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="window pattern"):
        window_offsets("nope", 3)


def test_block_sparse_keeps_first_diagonal_and_best_block():
    L, D = 96, 8
    q = torch.zeros(1, 1, L, D)
    k = torch.zeros(1, 1, L, D)
    q[..., 0] = 1.0
    k[0, 0, 32:48, 0] = 5.0  # block 2 is the only one aligned with the queries
    sel = select("block_sparse", q, k, 48)  # 3 blocks of 16
    assert keys_of(sel, L, 95) == list(range(16)) + list(range(32, 48)) + list(range(80, 96))


def test_block_sparse_uses_smaller_blocks_below_one_block_of_budget():
    q, k, _ = rand_qkv(1, 2, 2, 64, 8)
    sel = select("block_sparse", q, k, 6)
    assert sel.query_chunk == 6 and weights_read(q, k, sel).gt(0).sum(-1).max() <= 6


def test_vertical_slash_keeps_sink_columns_and_nearest_diagonals():
    q, k, _ = rand_qkv(1, 2, 1, 300, 16, seed=9)
    verticals, slashes = estimate_pattern(q, k, 80, 80, last_q=16)
    assert set(range(30)) <= set(verticals[0, 0].tolist())      # min(30, 80 // 2) sink columns
    assert set(range(40)) <= set(slashes[0, 0].tolist())        # min(100, 80 // 2) nearest diagonals
    sel = select("vertical_slash", q, k, 160, last_q=16)
    kept = set(keys_of(sel, 300, 299))
    assert set(range(30)) | set(range(260, 300)) <= kept and len(kept) <= 160


def test_vertical_slash_decode_reuses_the_prefill_pattern():
    q, k, _ = rand_qkv(1, 2, 1, 201, 16, seed=10)
    context = LayerContext()
    select("vertical_slash", q[:, :, :200], k[:, :, :200], 40, context)
    state = context.state["vertical_slash"]
    sel = select("vertical_slash", q[:, :, 200:], k, 40, context)
    want = set(state["verticals"][0, 0].tolist()) | {200 - s for s in state["slashes"][0, 0].tolist()}
    assert set(keys_of(sel, 201, 0, num_queries=1)) == want


def test_quest_bound_is_an_upper_bound_and_top_pages_are_kept():
    q, k, _ = rand_qkv(1, 2, 1, 64, 8, seed=11, Lq=1)
    lo, hi = page_bounds(k, 4)
    extremes = torch.stack([lo[0, 0], hi[0, 0]])                                   # [2, pages, D]
    bound = (q[0, :, 0][:, None, None, :] * extremes[None]).amax(1).sum(-1)         # [Hq, pages]
    true_max = (q[0, :, 0] @ k[0, 0].T).view(2, 16, 4).amax(-1)
    assert (bound >= true_max - 1e-5).all()
    sel = select("quest", q, k, 12)  # 3 pages of 4 per head
    for head in range(2):
        pages = sorted(bound[head].topk(3).indices.tolist())
        assert keys_of(sel, 64, 0, head, num_queries=1) == [p * 4 + i for p in pages for i in range(4)]


def test_quest_prefill_is_dense():
    q, k, v = rand_qkv(1, 4, 2, 60, 16)
    out = run_method(METHODS["quest"], q, k, v, small_config("quest", 8), LayerContext())
    torch.testing.assert_close(out, dense_reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_no_length_squared_memory(rss_growth_mib):
    """16K tokens: an L x L fp32 score matrix needs 1 GiB; per-query methods must stay well below it."""
    grown_mib = rss_growth_mib(
        "import torch\n"
        "from utils.attention import sparse_attention\n"
        "from utils.config import SparseAttentionConfig\n"
        "from utils.methods import METHODS, LayerContext\n"
        "q = torch.randn(1, 1, 16384, 16); k = torch.randn(1, 1, 16384, 16); v = torch.randn(1, 1, 16384, 16)",
        "for name in ('oracle_topk', 'vertical_slash', 'quest', 'streaming_dilated', 'block_sparse'):\n"
        "    cfg = SparseAttentionConfig(method=name, budget=64)\n"
        "    sparse_attention(q, k, v, METHODS[name].select(q, k, cfg, LayerContext()))")
    assert grown_mib < 600, f"peak memory grew by {grown_mib} MiB"


# ------------------------------------------------------------------------------------------------ models

@pytest.fixture(scope="module")
def tiny_models():
    from utils.models import tiny_model

    return {family: tiny_model(family) for family in ("llama", "gemma3")}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", SPARSE)
def test_patch_model_forward_and_generate(tiny_models, family, name, monkeypatch):
    """A patched model's logits and greedy tokens at a small budget equal those of the same model whose sparse
    layers run the reference executor (masked softmax over the selection), prefill and decode."""
    import utils.methods.registry
    from utils.patch import patch_model

    model = tiny_models[family]
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    options = dict(query_chunk=8, block_size=8, page_size=4, last_q=8, chunk_size=4, boundary_source="fixed",
                   dense_tail=8)  # DHSA's dense question tail: one tile of 8 of the 40 prompt queries
    with torch.no_grad():
        patch_model(model, method="dense")
        dense_logits = model(ids).logits
        dense_tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        if name in PEERS:
            options.update(PEER_OPTIONS)
        patch_model(model, method=name, budget=12, decode="sparse", **options)
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert tokens.shape == (1, 43) and torch.equal(tokens[:, :40], ids)
        if not METHODS[name].dense_prefill:  # quest: the prefill is dense
            assert (logits - dense_logits).abs().max() > 1e-3, "12 of 40 keys should change the logits"
        with monkeypatch.context() as patch:
            patch.setattr(utils.methods.registry, "sparse_attention", masked_attention)
            torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), tokens)
        if name in DENSE_AT_FULL_BUDGET:
            patch_model(model, method=name, density=1.0, **options)
            torch.testing.assert_close(model(ids).logits, dense_logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), dense_tokens)
        patch_model(model, method="dense")


# ------------------------------------------------------------------------------------------------ scripts

@pytest.fixture
def tiny_setup(monkeypatch, tmp_path):
    """The scripts' model loader replaced by a tiny random Gemma-3 (global layer 3), essays by a small folder."""
    import utils.models
    from utils.models import tiny_model, tiny_tokenizer

    monkeypatch.setattr(utils.models, "load_model",
                        lambda name, device="cpu", dtype=None, **kw: (tiny_model("gemma3"), tiny_tokenizer()))
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "a.txt").write_text("The attention of a query falls on a few keys.\nMost keys get almost nothing.\n" * 20)
    return tmp_path, essays


def test_recall_script_end_to_end_and_resume(tiny_setup):
    import pandas as pd

    tmp_path, essays = tiny_setup
    argv = ["--model", "tiny", "--lengths", "256", "--num-queries", "64", "--kept-keys", "16", "32", "512",
            "--methods", "oracle_topk", "streaming", "dhsa", "block_sparse", "--query-chunk", "32",
            "--block-size", "32", "--haystack-dir", str(essays), "--output-dir", str(tmp_path / "out"),
            "--device", "cpu", "--boundary-source", "fixed"]
    recall_main(argv)
    out = tmp_path / "out" / "tiny"
    table = pd.read_csv(out / "recall.csv")
    assert len(table) == 4 * 2 and set(table["kept_keys"]) == {16, 32}  # 512 >= the length: skipped
    assert (table.loc[table["method"] == "oracle_topk", "topk_overlap"] == 1).all()
    assert (out / "recall.png").stat().st_size > 0
    lines = (out / "recall.jsonl").read_text().splitlines()
    recall_main(argv)  # nothing left to do: no new lines
    assert (out / "recall.jsonl").read_text().splitlines() == lines


def test_mask_figure_end_to_end(tiny_setup):
    from visualize_attention_masks import main as masks_main

    tmp_path, essays = tiny_setup
    path = tmp_path / "masks.png"
    masks_main(["--model", "tiny", "--length", "128", "--budget", "32", "--min-budget", "0", "--query-chunk", "16",
                "--block-size", "16", "--haystack-dir", str(essays), "--output", str(path), "--device", "cpu",
                "--boundary-source", "fixed"])
    assert path.stat().st_size > 0
    with pytest.raises(SystemExit, match="not a sparse method"):
        masks_main(["--methods", "dense"])
