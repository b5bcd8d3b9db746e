"""Every sparse method of the registry against dense attention: causality from several angles (what a selection
lists, what the executor lets through, whether future values leak), and whole tiny models (Llama, Qwen2, Gemma-2,
Gemma-3) whose next-token distributions stay within a stated KL divergence of dense attention at 50% and 90%
density, in prefill and in sparse decode, and equal it at full density."""

import pytest
import torch
from transformers import DynamicCache

from utils.attention import dense_attention, sparse_attention
from utils.methods import METHODS, LayerContext, run_method
from utils.models import TINY_FAMILIES, tiny_model
from utils.patch import patch_model
from utils.selection import Selection

from test_baselines import (DENSE_AT_FULL_BUDGET, NOT_DENSE_AT_FULL_BUDGET, PEERS, SHAPES, SPARSE,
                            dense_reference, rand_qkv, refused, select, small_config)


# ------------------------------------------------------------------------------------------------ causality

@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [1, 5, 24, 50])
def test_selection_lists_only_keys_its_tile_may_see(name, shape, budget):
    """Before the executor's causal mask: each tile lists keys that its last query may read (position <= that
    query's), ascending and without repeats, so no budget slot goes to a future key."""
    q, k, _ = rand_qkv(*shape, seed=budget)
    # a budget the peers' matched mode refuses: their adaptive mode (no cap) instead
    selection = select(name, q, k, budget, **(dict(peer_budget="adaptive") if refused(name, budget) else {}))
    idx, T, L = selection.key_index, selection.query_chunk, q.shape[2]
    n_tiles = idx.shape[2]
    last_query = selection.q_offset + torch.clamp(torch.arange(1, n_tiles + 1) * T, max=L) - 1
    listed = idx >= 0
    assert not (listed & (idx > last_query[None, None, :, None])).any(), "a tile lists a key after its last query"
    assert (idx >= -1).all() and (idx < k.shape[2]).all()
    for row in idx.reshape(-1, idx.shape[-1]):
        keys = row[row >= 0]
        assert (torch.diff(keys) > 0).all(), "keys of a tile must be ascending and distinct"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("query_chunk", [1, 7, 32])
def test_executor_masks_future_keys_even_when_listed(shape, query_chunk):
    """A hand-made selection that lists every key (future ones too) for every tile is still causal attention, also
    for queries behind a KV cache (the last 5 queries, at positions L-5 .. L-1)."""
    q, k, v = rand_qkv(*shape, seed=query_chunk)
    B, Hkv, L = k.shape[0], k.shape[1], k.shape[2]

    def every_key(num_queries):
        return torch.arange(L).expand(B, Hkv, -(-num_queries // query_chunk), L).clone()

    ref = dense_reference(q, k, v)
    torch.testing.assert_close(sparse_attention(q, k, v, Selection(every_key(L), query_chunk, 0)), ref,
                               atol=2e-6, rtol=1e-5)
    tail = sparse_attention(q[:, :, -5:], k, v, Selection(every_key(5), query_chunk, L - 5))
    torch.testing.assert_close(tail, ref[:, :, -5:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", DENSE_AT_FULL_BUDGET)
@pytest.mark.parametrize("scale, softcap", [(0.1, None), (0.7, 3.0)])
def test_full_budget_equals_dense_with_the_models_scale_and_softcap(name, scale, softcap):
    """Models pass their own attention scale (Gemma: query_pre_attn_scalar ** -0.5, not head_dim ** -0.5) and
    soft-cap (Gemma-2); at full budget each method equals dense attention with both, prefill and a decode step."""
    q, k, v = rand_qkv(1, 4, 2, 70, 16, seed=15)
    G = q.shape[1] // k.shape[1]
    ref = dense_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale=scale, softcap=softcap)
    assert not torch.allclose(ref, dense_reference(q, k, v), atol=1e-3)  # the scale matters on these inputs
    for decode in ("dense", "sparse"):
        config = small_config(name, 70, decode=decode)
        out = run_method(METHODS[name], q, k, v, config, LayerContext(), scale=scale, softcap=softcap)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        step = run_method(METHODS[name], q[:, :, -1:], k, v, config, LayerContext(), scale=scale, softcap=softcap)
        torch.testing.assert_close(step, ref[:, :, -1:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("decode", ["dense", "sparse"])
def test_future_values_never_reach_earlier_queries(name, decode):
    """Changing the values at positions >= p leaves the outputs of queries before p bit-identical (selections
    depend on queries and keys only), in prefill and for a decode step that sees only the past."""
    B, Hq, Hkv, L, D = 1, 4, 2, 96, 16
    q, k, v = rand_qkv(B, Hq, Hkv, L, D, seed=12)
    config = small_config(name, 24, decode=decode)
    changed = v.clone()
    p = 53
    changed[:, :, p:] = torch.randn(changed[:, :, p:].shape, generator=torch.Generator().manual_seed(13)) * 100
    out = run_method(METHODS[name], q, k, v, config, LayerContext())
    out_changed = run_method(METHODS[name], q, k, changed, config, LayerContext())
    assert torch.equal(out[:, :, :p], out_changed[:, :, :p])
    assert not torch.equal(out[:, :, p:], out_changed[:, :, p:])  # the change is visible where it may be
    step = run_method(METHODS[name], q[:, :, p - 1:p], k[:, :, :p], changed[:, :, :p], config, LayerContext())
    torch.testing.assert_close(step, run_method(METHODS[name], q[:, :, p - 1:p], k[:, :, :p], v[:, :, :p], config,
                                                LayerContext()), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ whole models

# Mean KL(dense || sparse) of the next-token distributions, in nats, over the prompt positions (prefill) and over
# the decode steps (each new token attends through the method's own decode rule, decode="sparse"). Measured on these
# tiny models (initializer_range 0.05, 192-token prompt, 3 decode steps), the largest values over families were
# 1.1e-2 / 4.1e-4 (prefill 50% / 90%) and 2.6e-2 / 3.9e-3 (decode); the bounds leave about 2-4x room. Dilated and
# strided windows skip keys by design even at high density, so at 90% they get the 50% bounds.
# FlexPrefill stops adding blocks once they hold gamma (0.9) of a query's estimated attention mass, so a 90% density
# is only its cap; it is held to the 50% bounds, like methods that skip keys by design.
CAPPED_BY_OWN_THRESHOLD = {"flexprefill"}
KL_BOUND = {("prefill", 0.5): 2e-2, ("prefill", 0.9): 1.5e-3, ("decode", 0.5): 6e-2, ("decode", 0.9): 1e-2}
PROMPT, STEPS = 192, 3
OPTIONS = dict(query_chunk=16, block_size=16, page_size=4, last_q=16, chunk_size=8, boundary_source="fixed",
               decode="sparse")


def next_token_logprobs(model, ids):
    """Log-probabilities [PROMPT + STEPS, vocab]: one prefill of the prompt, then one token at a time (KV cache)."""
    cache = DynamicCache(config=model.config)
    logits = [model(ids[:, :PROMPT], past_key_values=cache, use_cache=True).logits]
    for t in range(PROMPT, PROMPT + STEPS):
        logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.log_softmax(torch.cat(logits, dim=1)[0].double(), dim=-1)


def kl_from_dense(reference, logprobs) -> dict[str, float]:
    kl = (reference.exp() * (reference - logprobs)).sum(-1)
    return {"prefill": kl[:PROMPT].mean().item(), "decode": kl[PROMPT:].mean().item()}


@pytest.mark.filterwarnings("ignore:no boundary-predictor weights")
@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_every_method_stays_close_to_dense_on_tiny_models(family):
    model = tiny_model(family, initializer_range=0.05)
    if family == "gemma2":
        model.set_attn_implementation("eager")  # its soft-capped reference (sdpa would drop the soft-capping)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    patch_model(model, "dense")
    reference = next_token_logprobs(model, ids)
    failures = []
    for name in SPARSE:
        for density in (0.5, 0.9, 1.0):
            # the peers' matched mode: their default (adaptive) has no density to compare with
            extra = dict(peer_budget="matched", flex_min_budget=0) if name in PEERS else {}
            patch_model(model, name, density=density, **OPTIONS, **extra)
            logprobs = next_token_logprobs(model, ids)
            if density == 1.0:
                if name in DENSE_AT_FULL_BUDGET:
                    torch.testing.assert_close(logprobs, reference, atol=1e-4, rtol=0, msg=f"{name} at full density")
                continue
            bound_density = 0.5 if name in NOT_DENSE_AT_FULL_BUDGET | CAPPED_BY_OWN_THRESHOLD else density
            for phase, kl in kl_from_dense(reference, logprobs).items():
                if not kl <= KL_BOUND[phase, bound_density]:
                    failures.append(f"{name} {phase} at {density:.0%}: KL {kl:.2e} > {KL_BOUND[phase, bound_density]}")
    # The measure can fail: attention on a single key per query (budget 1) is far outside the 90% bounds.
    patch_model(model, "streaming", budget=1, **OPTIONS)
    broken = kl_from_dense(reference, next_token_logprobs(model, ids))
    patch_model(model, "dense")
    assert not failures, "\n".join(failures)
    assert broken["prefill"] > 10 * KL_BOUND["prefill", 0.9] and broken["decode"] > 2 * KL_BOUND["decode", 0.9]
