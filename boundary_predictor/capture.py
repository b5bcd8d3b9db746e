"""Read the post-RoPE queries and keys of chosen layers out of one ordinary forward pass of a transformers LLM.

`capture_attention(model, layers, on_layer)` registers an attention function through transformers'
`AttentionInterface`: it hands (layer index, query [B, Hq, L, D], key [B, Hkv, L, D], layer options) to
`on_layer`, then runs the attention the model was using (sdpa, or the model's own eager attention, which
Gemma-2 needs for its logit soft-capping), so the model's outputs do not change. Works for every model that
follows the AttentionInterface convention (Llama, Qwen2, Gemma-2, Gemma-3, ...), GQA included. The previous
attention implementation is restored on exit.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_IMPLEMENTATION = "boundary_predictor_capture"
_active: dict = {}  # the current capture: {"layers": set[int] | None, "on_layer": callable, "previous": str}


def _previous_attention(module, name: str):
    """The attention function of implementation `name`; "eager" is defined per model in its modeling file."""
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if name != "eager" or eager is None:
        raise ValueError(f"cannot capture attention of implementation {name!r}; load the model with sdpa or eager")
    return eager


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    layer = getattr(module, "layer_idx", None)
    if _active and (_active["layers"] is None or layer in _active["layers"]):
        options = {
            "scaling": kwargs.get("scaling"),
            "sliding_window": kwargs.get("sliding_window"),
            "softcap": kwargs.get("softcap"),
        }
        _active["on_layer"](layer, query, key, options)
    attention = _previous_attention(module, _active.get("previous", "sdpa"))
    return attention(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_IMPLEMENTATION, _capturing_attention)
AttentionMaskInterface.register(_IMPLEMENTATION, sdpa_mask)


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def num_layers(model) -> int:
    return int(_text_config(model).num_hidden_layers)


def global_layers(model) -> list[int]:
    """Indices of the full-attention layers (where DHSA applies); sliding-window layers stay dense.

    Uses `config.layer_types` when the model has it (Gemma-2/3, Qwen2), else every layer is global (Llama).
    """
    config = _text_config(model)
    types = getattr(config, "layer_types", None)
    if not types:
        return list(range(config.num_hidden_layers))
    layers = [i for i, kind in enumerate(types) if kind == "full_attention"]
    if not layers:
        raise ValueError("the model has no full-attention layers; choose layers explicitly (--layers 0 1 ...)")
    return layers


def resolve_layers(model, layers: str | list[int] | None) -> list[int]:
    """`None`/"global" -> global_layers(model); "all" -> every layer; a list of ints is checked and sorted."""
    if layers is None or layers == "global" or layers == ["global"]:
        return global_layers(model)
    if layers == "all" or layers == ["all"]:
        return list(range(num_layers(model)))
    try:
        out = sorted({int(i) for i in layers})
    except ValueError:
        raise ValueError(f"layers must be 'global', 'all' or layer indices, got {layers}") from None
    n = num_layers(model)
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")
    return out


def kv_shape(model) -> tuple[int, int]:
    """(Hkv, D): key heads and head dim, i.e. the predictor's input is Hkv * D features per token."""
    config = _text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_key_value_heads), int(head_dim)


@contextmanager
def capture_attention(model, layers: list[int] | None,
                      on_layer: Callable[[int, torch.Tensor, torch.Tensor, dict], None]):
    """Within the block, each forward of `model` calls on_layer(layer, query, key, options) for `layers`.

    options: {"scaling", "sliding_window", "softcap"} as the layer passes them to its attention function.
    Not re-entrant (one capture at a time). Use use_cache=False and unpadded inputs.
    """
    if _active:
        raise RuntimeError("capture_attention is already active; nested captures are not supported")
    previous = model.config._attn_implementation
    # the mask builder of the previous implementation (eager wants additive masks, sdpa boolean ones)
    mask_builder = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous, sdpa_mask)
    AttentionMaskInterface.register(_IMPLEMENTATION, mask_builder)
    model.set_attn_implementation(_IMPLEMENTATION)
    _active.update(layers=None if layers is None else set(layers), on_layer=on_layer, previous=previous)
    try:
        yield
    finally:
        _active.clear()
        model.set_attn_implementation(previous)


def capture_keys(model, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """One forward pass; returns {layer: post-RoPE keys [B, Hkv, L, D]} (model dtype, model device)."""
    keys: dict[int, torch.Tensor] = {}

    def keep(layer, query, key, options):
        keys[layer] = key.detach()

    with torch.no_grad(), capture_attention(model, layers, keep):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    missing = [i for i in layers if i not in keys]
    if missing:
        raise RuntimeError(f"layers {missing} did not run through the attention interface; unsupported model?")
    return keys


def capture_queries_and_keys(model, input_ids: torch.Tensor, layers: list[int], first_query: int = 0,
                             rows: torch.Tensor | None = None) -> dict:
    """One forward pass; {layer: (q [B, Hq, L - first_query, D], k [B, Hkv, L, D], options)} for `layers` (model
    dtype, model device; options: scaling, sliding_window, softcap as the layer passes them to its attention
    function). Only the queries from `first_query` on are kept (copied, so the rest can be freed); or, with
    `rows` (query positions), q is [B, Hq, len(rows), D], those queries only."""
    out = {}

    def keep(layer, query, key, options):
        part = query[:, :, rows.to(query.device)] if rows is not None else query[:, :, first_query:]
        out[layer] = (part.detach().clone(), key.detach(), options)

    with torch.no_grad(), capture_attention(model, layers, keep):
        model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    missing = [i for i in layers if i not in out]
    if missing:
        raise RuntimeError(f"layers {missing} did not run through the attention interface; unsupported model?")
    return out


__all__ = ["capture_attention", "capture_keys", "capture_queries_and_keys", "global_layers", "resolve_layers",
           "kv_shape", "num_layers"]
