"""Decode protocol (`decode`): dense decode reads every key; sparse decode (Algorithm 2) reads at most N_b keys and
always the newest ones, so a model can read what it just wrote (the failure that garbled Qwen2.5's needle answers:
"The best best to do do in San in to San.")."""

import pytest
import torch

import utils.methods.registry as registry
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods import METHODS, LayerContext
from utils.models import TINY_FAMILIES, tiny_model
from utils.patch import patch_model

# Methods whose decode rule keeps the newest keys. Not oracle_topk (exactly the top-N_b keys by true score, an
# upper bound by definition) nor quest (the paper's page bound decides, the current page included or not).
KEEPS_NEWEST = [name for name, m in METHODS.items() if m.select is not None and name not in ("oracle_topk", "quest")]


def prompt(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


def spy_decode_selections(monkeypatch):
    """Record (number of keys, key_index) of every one-query sparse call."""
    seen = []
    original = registry.sparse_attention

    def spy(q, k, v, selection, **kw):
        if q.shape[2] == 1:
            seen.append((k.shape[2], selection.key_index.clone(), selection.mask(1, k.shape[2])))
        return original(q, k, v, selection, **kw)

    monkeypatch.setattr(registry, "sparse_attention", spy)
    return seen


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", KEEPS_NEWEST)
@torch.no_grad()
def test_every_sparse_decode_step_reads_the_newest_token(family, method, monkeypatch):
    model = tiny_model(family).eval()
    seen = spy_decode_selections(monkeypatch)
    # FlexPrefill and XAttention keep no budget by default (their authors' adaptive density): checked matched here
    peers = dict(peer_budget="matched", flex_min_budget=0, block_size=4) if method in ("flexprefill", "xattention") \
        else dict(block_size=16)
    patch_model(model, method, budget=24, query_chunk=16, page_size=4, last_q=8, chunk_size=8,
                boundary_source="fixed", decode="sparse", **peers)
    model.generate(prompt(model, 140, seed=1), attention_mask=torch.ones(1, 140, dtype=torch.long),
                   max_new_tokens=4, do_sample=False)
    assert seen, f"{method}: no sparse decode step ran"
    for num_keys, _, mask in seen:  # mask: [B, heads, 1, num_keys], the keys each head reads
        assert (mask.sum(-1) <= 24).all(), f"{method} reads more than N_b keys at decode"
        assert mask[..., -1].all(), f"{method} drops the current token at a decode step ({num_keys} keys)"


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_dhsa_sparse_decode_keeps_generated_tokens_and_local_window(family, monkeypatch):
    model = tiny_model(family).eval()
    seen = spy_decode_selections(monkeypatch)
    patch_model(model, "dhsa", budget=40, query_chunk=16, boundary_source="fixed", decode="sparse",
                sink_tokens=4, local_tokens=12)
    ids = prompt(model, 150, seed=2)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    for num_keys, key_index, _ in seen:
        generated = num_keys - 150
        must = set(range(num_keys - max(12, generated), num_keys)) | set(range(4))
        for row in key_index.reshape(-1, key_index.shape[-1]):
            assert must <= set(row.tolist()), f"decode step at {num_keys} keys misses {sorted(must - set(row.tolist()))}"


@torch.no_grad()
def test_decode_keeps_the_newest_token_even_when_its_chunk_scores_lowest():
    """A current token whose own chunk scores far below every other chunk is still read."""
    from utils.methods.dhsa.boundaries import fixed_size_ends
    from utils.methods.dhsa.select import dhsa_select
    from utils.methods.dhsa.scores import decode_boundaries

    g = torch.Generator().manual_seed(3)
    L = 200
    k = torch.randn(1, 2, L, 16, generator=g)
    q = -k[:, :, -1:].repeat_interleave(2, dim=1) * 10  # the query points away from its own key
    ends = [decode_boundaries(fixed_size_ends(L - 1, 8), L - 1, L)]
    plain = dhsa_select(q, k, budget=32, boundaries=ends, options=DHSAOptions(sink_tokens=0, local_tokens=0))
    assert not (plain.key_index == L - 1).any(-1).all(), "the case should be adversarial for chunk scores alone"
    for sink, local in ((0, 0), (4, 8)):
        config = SparseAttentionConfig(method="dhsa", budget=32, boundary_source="fixed", chunk_size=8,
                                       decode="sparse", sink_tokens=sink, local_tokens=local)
        context = LayerContext()
        METHODS["dhsa"].select(q.new_zeros(1, 4, L - 1, 16), k[:, :, : L - 1], config, context)  # prefill
        selection = METHODS["dhsa"].select(q, k, config, context)  # decode step
        assert (selection.key_index == L - 1).any(-1).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_sparse_decode_equals_dense_when_the_local_window_covers_the_prompt(family):
    """Budget >= prompt + answer and a local window that covers them: sparse decode must generate what dense does."""
    model = tiny_model(family).eval()
    ids = prompt(model, 90, seed=4)
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    patch_model(model, "dhsa", budget=128, query_chunk=16, boundary_source="fixed", decode="sparse",
                sink_tokens=4, local_tokens=100)
    sparse = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(sparse, dense)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_dense_decode_equals_dense_after_a_full_budget_prefill(family, monkeypatch):
    """decode="dense": decode steps never reach a sparse selection."""
    model = tiny_model(family).eval()
    seen = spy_decode_selections(monkeypatch)
    patch_model(model, "dhsa", budget=24, query_chunk=16, boundary_source="fixed", decode="dense")
    ids = prompt(model, 120, seed=5)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert seen == []


def test_decode_option_is_checked():
    with pytest.raises(ValueError, match="decode must be dense or sparse"):
        SparseAttentionConfig(decode="fast")
    assert SparseAttentionConfig(method="quest").decode == "sparse"  # Quest acts only at decode
    assert SparseAttentionConfig(method="dense", density=None, decode="sparse").decode == "dense"  # one dense run
