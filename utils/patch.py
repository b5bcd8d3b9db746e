"""Drop-in patching: every registry method becomes a transformers attention implementation.

Importing this module registers each sparse method name (e.g. "dhsa", "streaming") with transformers'
`AttentionInterface`, together with the SDPA mask builder, so that

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="dhsa")   # paper defaults, or
    patch_model(model, method="dhsa", density=0.0625, query_chunk=256)              # configured

switch every supported model family (Llama, Qwen2, Gemma-2, Gemma-3, ...) without touching its code.
Layers with a sliding window (Gemma-2/3 local layers) keep their exact windowed attention; layers listed in
`dense_layers` stay dense; the sparse method runs on the other (global) layers, in prefill and decode.
Sparse methods run one unpadded sequence at a time (the paper loops over a batch per example).
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from utils.attention import dense_attention, sliding_window_attention
from utils.config import SparseAttentionConfig, config_field_names
from utils.methods import LayerContext, get_method, method_names, run_method

_SHARED_BY_CONFIG: dict[int, dict] = {}  # per-model shared state for models set up only via attn_implementation=


def _default_context(module) -> tuple[SparseAttentionConfig, LayerContext]:
    """Config and context for a model loaded with attn_implementation="<method>" and never patched."""
    config = SparseAttentionConfig(method=module.config._attn_implementation)
    shared = _SHARED_BY_CONFIG.get(id(module.config))
    if shared is None:  # the first call of this model: the method's setup, once (it sees the layer, not the model)
        shared = _SHARED_BY_CONFIG[id(module.config)] = {}
        setup = get_method(config.method).setup
        if setup is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setup(module, config, shared)
    return config, LayerContext(getattr(module, "layer_idx", 0), {}, shared)


def _is_sliding(module, sliding_window) -> bool:
    return sliding_window is not None or getattr(module, "sliding_window", None) is not None


def _filled_keys(mask: torch.Tensor | None, num_keys: int, window: int | None = None) -> int | None:
    """How many leading keys the last query reads, or None if the mask has padding. A pre-allocated (static)
    cache leaves unfilled slots at the end, which are dropped; any other hole in the mask is padding. On a
    sliding-window layer the last query reads only the `window` keys before that point."""
    if mask is None:
        return num_keys
    last_row = mask[..., -1, :].reshape(-1, mask.shape[-1])
    last_row = last_row if last_row.dtype == torch.bool else last_row == 0
    positions = torch.arange(mask.shape[-1], device=mask.device)
    filled = int(torch.where(last_row[0], positions + 1, 0).max())  # one past the last key read
    expected = positions < filled
    if window is not None:
        expected &= positions >= filled - window
    if not (last_row == expected).all():
        return None
    return filled


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> ([B, L, Hq, D], None).

    Global layers run the configured method; sliding-window layers run exact windowed attention; layers in
    `dense_layers` run dense attention. Soft-capping (Gemma-2) is applied everywhere, as the model defines it.
    """
    config = getattr(module, "sparse_config", None)
    context = getattr(module, "sparse_context", None)
    if config is None or context is None:
        config, context = _default_context(module)
        module.sparse_config, module.sparse_context = config, context
    method = get_method(config.method)
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    dense_layer = method.select is None or context.layer_idx in config.dense_layers
    filled = _filled_keys(attention_mask, key.shape[2], window)
    if filled is None:  # padded batch: exact masked attention where that is what the layer does, else an error
        if window is None and not dense_layer:
            raise ValueError("sparse attention runs one unpadded sequence at a time: use batch size 1 "
                             "(or equal-length sequences without padding)")
        out = dense_attention(query, key, value, scale=scaling, softcap=softcap, attention_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None
    key, value = key[:, :, :filled], value[:, :, :filled]
    if window is not None:
        out = sliding_window_attention(query, key, value, window, scale=scaling, softcap=softcap)
    elif dense_layer:
        out = dense_attention(query, key, value, scale=scaling, softcap=softcap)
    else:
        out = run_method(method, query, key, value, config, context, scale=scaling, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _register_all() -> None:
    for name in method_names():
        if name != "dense":
            AttentionInterface.register(name, sparse_attention_forward)
            AttentionMaskInterface.register(name, sdpa_mask)


_register_all()


def attention_layers(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (those that carry a `layer_idx`), in layer order."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    return sorted(layers, key=lambda m: m.layer_idx)


def sparse_layer_indices(model, config: SparseAttentionConfig) -> list[int]:
    """Indices of the layers where the sparse method runs (global layers not kept dense)."""
    return [m.layer_idx for m in attention_layers(model)
            if not _is_sliding(m, None) and m.layer_idx not in config.dense_layers]


def patch_model(model, method: str = "dhsa", density: float | None = None, budget: int | None = None, *,
                config: SparseAttentionConfig | None = None, tokenizer=None, **options):
    """Switch the attention of every layer of `model` to `method` (a registry name); returns the model.

    density / budget set N_b; `options` are any other SparseAttentionConfig fields (query_chunk, max_chunks,
    dense_layers, share_boundaries, ...); or pass a ready `config`. method="dense" restores the model's own
    attention implementation. Calling again re-configures. `tokenizer` is only needed for newline boundaries.
    """
    if config is None:
        unknown = set(options) - set(config_field_names())
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {', '.join(config_field_names())}")
        values = dict(options, method=method)
        if density is not None:
            values["density"] = density
        if budget is not None:
            values["budget"] = budget
        config = SparseAttentionConfig(**values)
    chosen = get_method(config.method)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"found no attention layers with a layer_idx in {type(model).__name__}")

    if not hasattr(model, "_dense_attn_implementation"):
        model._dense_attn_implementation = model.config._attn_implementation
    if chosen.select is None:
        model.set_attn_implementation(model._dense_attn_implementation)
        for layer in layers:
            for attr in ("sparse_config", "sparse_context"):
                if hasattr(layer, attr):
                    delattr(layer, attr)
        return model

    model.set_attn_implementation(config.method)
    shared: dict = {}
    if chosen.setup is not None:  # what the method loads once per patch (DHSA: its boundary source)
        chosen.setup(model, config, shared, tokenizer)
    for layer in layers:
        layer.sparse_config = config
        layer.sparse_context = LayerContext(layer.layer_idx, {}, shared)
    return model


__all__ = ["patch_model", "sparse_attention_forward", "attention_layers", "sparse_layer_indices"]
