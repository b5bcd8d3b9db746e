"""Drop-in patching on tiny random models of every family: full budget equals the model's own attention,
decode equals prefill, sliding-window layers keep their window, re-configuration and bad arguments."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from utils.methods import get_method
from utils.models import TINY_FAMILIES, tiny_model
from utils.patch import attention_layers, patch_model, sparse_layer_indices

from test_baselines import masked_attention


def reference_impl(family):
    # Gemma-2 soft-caps attention logits, which torch SDPA cannot; its exact reference is "eager".
    return "eager" if family == "gemma2" else "sdpa"


def prompt(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


@pytest.fixture(params=TINY_FAMILIES)
def family_model(request):
    model = tiny_model(request.param).eval()
    model.set_attn_implementation(reference_impl(request.param))
    return request.param, model


@torch.no_grad()
def test_full_budget_logits_equal_dense(family_model, monkeypatch):
    import utils.methods.registry

    family, model = family_model
    ids = prompt(model, 150)
    ref = model(ids).logits
    patch_model(model, "dhsa", budget=10_000, query_chunk=16, boundary_source="fixed")
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    # At 10% the logits change, and are those of the reference executor (masked softmax) on the same selections:
    # scaling, soft-capping, GQA and sliding layers are wired through the patch as the model's own attention does.
    patch_model(model, "dhsa", density=0.1, query_chunk=16, boundary_source="fixed")
    sparse = model(ids).logits
    assert (sparse - ref).abs().max() > 1e-3, "a small budget should change the logits"
    monkeypatch.setattr(utils.methods.registry, "sparse_attention", masked_attention)
    torch.testing.assert_close(model(ids).logits, sparse, atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    patch_model(model, "dense")
    assert model.config._attn_implementation == reference_impl(family)
    torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)


@torch.no_grad()
def test_decode_logits_equal_prefill_logits_at_full_budget(family_model):
    _, model = family_model
    ids = prompt(model, 90, seed=1)
    ref = model(ids).logits  # one dense prefill of the whole sequence
    patch_model(model, "dhsa", budget=10_000, query_chunk=16, boundary_source="fixed")
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :80], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits, ref[:, :80], atol=1e-5, rtol=1e-4)
    for t in range(80, 90):  # Algorithm 2, one token at a time
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], ref[:, t], atol=1e-5, rtol=1e-4)


def greedy_by_hand(model, ids, steps, decode_patch=None):
    """Greedy tokens: one prefill of `ids`, then one token at a time through a KV cache; `decode_patch` (keyword
    arguments of patch_model) re-patches the model after the prefill."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    if decode_patch is not None:
        patch_model(model, **decode_patch)
    tokens = []
    for _ in range(steps):
        tokens.append(logits.argmax(-1, keepdim=True))
        if len(tokens) < steps:
            logits = model(tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat([ids] + tokens, dim=1)


@torch.no_grad()
def test_generate_end_to_end_with_sparse_prefill_and_decode(family_model, monkeypatch):
    """generate() with a sparse prefill and either decode protocol: sparse selections of at most N_b keys in the
    sparse layers only, and the tokens of a hand-written loop: decode="dense" is the sparse prefill followed by
    the model's own dense attention, decode="sparse" the reference executor (masked softmax) on every step."""
    family, model = family_model
    import utils.methods.registry as registry

    seen = []
    original = registry.sparse_attention

    def spy(q, k, v, selection, **kw):
        seen.append((q.shape[2], k.shape[2], selection.max_keys))
        return original(q, k, v, selection, **kw)

    monkeypatch.setattr(registry, "sparse_attention", spy)
    ids = prompt(model, 120, seed=2)
    for decode, sparse_steps in (("sparse", 3), ("dense", 0)):
        seen.clear()
        patch_model(model, "dhsa", budget=24, query_chunk=16, boundary_source="fixed", decode=decode)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 124)
        sparse_layers = len(sparse_layer_indices(model, model.model.layers[0].self_attn.sparse_config))
        prefill = [s for s in seen if s[0] > 1]
        decode_calls = [s for s in seen if s[0] == 1]
        assert len(prefill) == sparse_layers and len(decode_calls) == sparse_steps * sparse_layers, decode
        assert all(max_keys <= 24 for _, _, max_keys in seen)
        with monkeypatch.context() as patch:
            if decode == "dense":
                by_hand = greedy_by_hand(model, ids, 4, decode_patch={"method": "dense"})
            else:
                patch.setattr(registry, "sparse_attention", masked_attention)
                by_hand = greedy_by_hand(model, ids, 4)
        assert torch.equal(out, by_hand), decode


@torch.no_grad()
def test_sliding_window_layers_keep_their_window():
    model = tiny_model("gemma3").eval()
    ids = prompt(model, 100, seed=3)
    ref = model(ids).logits
    layers = attention_layers(model)
    sliding = [m.layer_idx for m in layers if m.sliding_window is not None]
    global_layers = [m.layer_idx for m in layers if m.sliding_window is None]
    assert sliding and global_layers
    # With every global layer kept dense, the patched model must equal the original exactly: the sliding
    # layers were not touched by the sparse method.
    patch_model(model, "dhsa", budget=8, dense_layers=global_layers, boundary_source="fixed")
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    config = model.model.layers[0].self_attn.sparse_config
    assert sparse_layer_indices(model, config) == []
    patch_model(model, "dhsa", budget=8, boundary_source="fixed")
    assert sparse_layer_indices(model, model.model.layers[0].self_attn.sparse_config) == global_layers


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_sliding_layers_run_the_windowed_path_not_masked_dense(family, monkeypatch):
    """The model's sliding-window mask is recognised as unpadded: local layers run O(L * window) attention
    (utils.attention.sliding_window_attention), never the masked dense fallback meant for padded batches."""
    import utils.patch as patch_module

    model = tiny_model(family).eval()
    window = min(m.sliding_window for m in attention_layers(model) if m.sliding_window is not None)
    ids = prompt(model, window + 37, seed=5)  # longer than the window, so the mask is not plain causal
    ref = model(ids).logits
    calls = []
    real = patch_module.sliding_window_attention
    monkeypatch.setattr(patch_module, "sliding_window_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    global_layers = [m.layer_idx for m in attention_layers(model) if m.sliding_window is None]
    patch_model(model, "dhsa", budget=8, dense_layers=global_layers, boundary_source="fixed")
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)
    assert len(calls) == sum(m.sliding_window is not None for m in attention_layers(model))


@torch.no_grad()
def test_share_boundaries_computes_once_per_forward():
    model = tiny_model("llama", num_hidden_layers=3).eval()
    calls = []

    class CountingSource:
        def __call__(self, keys, max_chunks, input_ids=None):
            calls.append(keys.shape[2])
            return [torch.arange(8, keys.shape[2], 8).tolist() + [keys.shape[2]]] * keys.shape[0]

    ids = prompt(model, 64)
    for share, expected in ((True, 1), (False, 3)):
        patch_model(model, "dhsa", budget=16, query_chunk=16, share_boundaries=share)
        for layer in attention_layers(model):
            layer.sparse_context.boundary_source = CountingSource()
        calls.clear()
        model(ids)
        model(ids)  # a second forward recomputes: boundaries never leak across prompts
        assert len(calls) == 2 * expected


@torch.no_grad()
def test_attn_implementation_name_at_load_time(tmp_path):
    model = tiny_model("qwen2").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dhsa").eval()
    assert loaded.config._attn_implementation == "dhsa"
    ids = prompt(loaded, 300)
    dense = tiny_model("qwen2").eval()  # same seed, same weights
    out, ref = loaded(ids).logits, dense(ids).logits
    assert (out - ref).abs().max() > 1e-4  # the default density (12.5%) is sparse at 300 tokens
    patch_model(dense, "dhsa")  # the same defaults through patch_model: the same logits
    torch.testing.assert_close(out, dense(ids).logits, atol=1e-6, rtol=1e-6)


def test_patch_reconfigures_and_validates():
    model = tiny_model("llama").eval()
    patch_model(model, "dhsa", density=0.25, query_chunk=32)
    cfg = model.model.layers[0].self_attn.sparse_config
    assert (cfg.density, cfg.query_chunk) == (0.25, 32)
    patch_model(model, "dhsa", budget=64, max_chunks=10)
    cfg = model.model.layers[0].self_attn.sparse_config
    assert (cfg.budget, cfg.max_chunks, cfg.query_chunk) == (64, 10, 64)
    with pytest.raises(ValueError, match="unknown attention method"):
        patch_model(model, "no-such-method")
    with pytest.raises(ValueError, match="unknown option"):
        patch_model(model, "dhsa", bogus=1)
    with pytest.raises(ValueError, match="density"):
        patch_model(model, "dhsa", density=1.5)
    assert get_method("dhsa").select is not None


def test_config_is_frozen_and_setup_is_the_methods():
    """Issue 23: every layer holds the same config, so it cannot be edited (a change is a new value); only a method
    with a setup hook (DHSA) gets a boundary source, patch_model itself knows none."""
    import dataclasses

    from utils.config import SparseAttentionConfig

    model = tiny_model("llama").eval()
    patch_model(model, "dhsa", density=0.25)
    layers = attention_layers(model)
    cfg = layers[0].sparse_config
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.density = 0.5
    assert cfg.replace(density=0.5).density == 0.5 and all(layer.sparse_config.density == 0.25 for layer in layers)
    assert SparseAttentionConfig(method="quest").decode == "sparse"  # normalised in the constructor
    assert SparseAttentionConfig(method="dense", decode="sparse").decode == "dense"
    assert SparseAttentionConfig(dense_layers=[1, 0]).dense_layers == (1, 0)
    assert "boundary_source" in layers[0].sparse_context.shared
    patch_model(model, "streaming", density=0.25)
    assert get_method("streaming").setup is None and attention_layers(model)[0].sparse_context.shared == {}


@torch.no_grad()
def test_padding_is_rejected_with_a_clear_error():
    model = tiny_model("llama").eval()
    patch_model(model, "dhsa", budget=16)
    ids = prompt(model, 40)
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    with pytest.raises(ValueError, match="unpadded"):
        model(ids, attention_mask=mask)
