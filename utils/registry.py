"""The one list of attention methods. Runners, benchmarks and tests iterate over `METHODS`.

A method is a *selection rule*: `select(q, k, config, context) -> Selection` says which keys each query may
read; `utils.attention.sparse_attention` then runs the attention. `select=None` means dense attention.
`dense_prefill=True` marks methods that only act at decode time (Quest): prefill stays dense.
Methods with learned or per-model state (boundary predictors, trained gates) keep it in `LayerContext`:
`context.state` lives on one attention layer across calls (prefill -> decode), `context.shared` is shared
by all layers of a model, and `setup(model, config)` (optional) loads what a method needs once per patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import Selection, dense_attention, sparse_attention
from .boundaries import FixedSizeBoundaries, as_boundary_list
from .config import SparseAttentionConfig
from .dhsa import decode_boundaries, dhsa_select


@dataclass
class LayerContext:
    """What a method may know about the layer it runs in, beyond q and k."""

    layer_idx: int = 0
    state: dict = field(default_factory=dict)       # this layer's memory across calls (e.g. prompt boundaries)
    shared: dict = field(default_factory=dict)      # shared by all layers of the model (e.g. shared boundaries)
    boundary_source: Callable | None = None         # DHSA: keys -> chunk ends (utils/boundaries.py)


@dataclass(frozen=True)
class AttentionMethod:
    name: str
    summary: str
    select: Callable[[torch.Tensor, torch.Tensor, SparseAttentionConfig, LayerContext], Selection] | None
    dense_prefill: bool = False
    setup: Callable | None = None


METHODS: dict[str, AttentionMethod] = {}


def register(method: AttentionMethod) -> AttentionMethod:
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> AttentionMethod:
    if name not in METHODS:
        raise ValueError(f"unknown attention method {name!r}; choose one of: {', '.join(METHODS)}")
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


# --------------------------------------------------------------------------------------------------- DHSA

def _prompt_boundaries(keys, config: SparseAttentionConfig, context: LayerContext, dynamic: bool):
    """Chunk ends for a prefill; with share_boundaries the first sparse layer of a forward computes them and
    the later layers of the same forward reuse them (the layers run in increasing index order)."""
    L = keys.shape[2]
    source = context.boundary_source if dynamic and context.boundary_source is not None else None
    if source is None:
        source = FixedSizeBoundaries(None if config.max_chunks is not None else config.chunk_size)
    shared = context.shared.get("boundaries")
    if config.share_boundaries and shared is not None and shared[0] < context.layer_idx and shared[1] == L \
            and shared[2] == keys.shape[0]:
        return shared[3]
    ends = as_boundary_list(source(keys, config.num_chunks(L), context.shared.get("input_ids")),
                            keys.shape[0], L, device=keys.device)
    if config.share_boundaries:
        context.shared["boundaries"] = (context.layer_idx, L, keys.shape[0], ends)
    return ends


def _dhsa(robust: bool, dynamic: bool):
    def select(q, k, config: SparseAttentionConfig, context: LayerContext) -> Selection:
        Lq, Lk = q.shape[2], k.shape[2]
        state = context.state.get("dhsa")
        if Lq == 1 and Lk > 1:  # decode step, Algorithm 2
            if state is None or state["prompt_len"] >= Lk or state["batch"] != k.shape[0]:
                ends = _prompt_boundaries(k[:, :, : Lk - 1], config, context, dynamic)
                state = {"prompt_len": Lk - 1, "ends": ends, "batch": k.shape[0]}
                context.state["dhsa"] = state
            ends = [decode_boundaries(e, state["prompt_len"], Lk) for e in state["ends"]]
            # Every decode step reads the tokens generated so far (the current one included) and the local window
            # before them, as always-kept keys (capped at half of N_b like every local window).
            local = max(config.local_tokens, Lk - state["prompt_len"])
        else:
            local = config.local_tokens
            ends = _prompt_boundaries(k, config, context, dynamic)
            context.state["dhsa"] = {"prompt_len": Lk, "ends": ends, "batch": k.shape[0]}
        return dhsa_select(q, k, budget=config.resolve_budget(Lk), boundaries=ends,
                           query_chunk=config.query_chunk, robust=robust, sink_tokens=config.sink_tokens,
                           local_tokens=local, share_heads=config.share_heads,
                           query_pooling=config.query_pooling, head_pooling=config.head_pooling,
                           center_keys=config.center_keys)
    return select


def _dhsa_from_config(q, k, config, context):
    return _dhsa(config.robust_chunk_repr, True)(q, k, config, context)


register(AttentionMethod("dense", "exact causal attention (SDPA)", None))
register(AttentionMethod("dhsa", "DHSA: dynamic chunks, length-normalised chunk scores, token top-N_b per query chunk",
                         _dhsa_from_config))
register(AttentionMethod("dhsa_no_robust_repr", "DHSA ablation: plain mean chunk vectors (Table 4)",
                         _dhsa(robust=False, dynamic=True)))
register(AttentionMethod("dhsa_fixed_chunks", "DHSA ablation: uniform chunks instead of learned boundaries (Table 4)",
                         _dhsa(robust=True, dynamic=False)))

from . import baselines  # noqa: E402,F401  (each baseline module registers its methods)

__all__ = ["METHODS", "AttentionMethod", "LayerContext", "register", "method_names", "get_method", "run_method"]
