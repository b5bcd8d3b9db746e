"""The one table of attention methods: `METHODS`, filled by `register`. Runners, benchmarks and tests iterate over it.

Importing this module gives the table with "dense" only; `utils.methods` imports every module that registers a
method (utils/methods/dhsa/__init__.py, utils/methods/baselines/), so read the table through `utils.methods`.

A method is a *selection rule*: `select(q, k, config, context) -> Selection` says which keys each query may
read; `utils.attention.sparse_attention` then runs the attention. `select=None` means dense attention.
`dense_prefill=True` marks methods that only act at decode time (Quest): prefill stays dense.
Methods with learned or per-model state (boundary predictors, trained gates) keep it in `LayerContext`:
`context.state` lives on one attention layer across calls (prefill -> decode), `context.shared` is shared
by all layers of a model, and `setup(model, config, shared, tokenizer)` (optional) loads what a method needs once
per patch into `shared` (DHSA: its boundary source); patch_model calls it and knows no method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from utils.attention import dense_attention, sparse_attention
from utils.config import SparseAttentionConfig
from utils.selection import Selection


@dataclass
class LayerContext:
    """What a method may know about the layer it runs in, beyond q and k."""

    layer_idx: int = 0
    state: dict = field(default_factory=dict)       # this layer's memory across calls (e.g. prompt boundaries)
    shared: dict = field(default_factory=dict)      # shared by all layers of the model (e.g. shared boundaries)
    boundary_source: Callable | None = None         # DHSA: keys -> chunk ends, given from outside (recall);
                                                    # a patched model's is in shared (DHSA's setup puts it there)


@dataclass(frozen=True)
class AttentionMethod:
    name: str
    summary: str
    select: Callable[[torch.Tensor, torch.Tensor, SparseAttentionConfig, LayerContext], Selection] | None
    dense_prefill: bool = False
    setup: Callable | None = None  # (model, config, shared, tokenizer=None) -> None, once per patch


METHODS: dict[str, AttentionMethod] = {}


def register(method: AttentionMethod) -> AttentionMethod:
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> AttentionMethod:
    if name not in METHODS:
        raise ValueError(f"unknown attention method {name!r}; choose one of: {', '.join(METHODS)} "
                         "(import utils.methods to register them all)")
    return METHODS[name]


def run_method(method: AttentionMethod, q, k, v, config: SparseAttentionConfig, context: LayerContext, *,
               scale=None, softcap=None) -> torch.Tensor:
    """Attention output [B, Hq, Lq, D] of `method` for q: [B, Hq, Lq, D], k, v: [B, Hkv, Lk, D].

    Decode steps (one query) of prefill methods run dense attention when config.decode == "dense"."""
    decoding = q.shape[2] == 1 and k.shape[2] > 1
    if method.select is None or (method.dense_prefill and q.shape[2] > 1) \
            or (decoding and config.decode == "dense" and not method.dense_prefill):
        return dense_attention(q, k, v, scale=scale, softcap=softcap)
    selection = method.select(q, k, config, context)
    return sparse_attention(q, k, v, selection, scale=scale, softcap=softcap)


register(AttentionMethod("dense", "exact causal attention (SDPA)", None))

__all__ = ["METHODS", "AttentionMethod", "LayerContext", "register", "method_names", "get_method", "run_method"]
