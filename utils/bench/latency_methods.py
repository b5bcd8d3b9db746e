"""How the latency benchmark runs one attention layer with each method: a table from method name to
(select, attend). run_latency_test.py times every entry with one loop: `select` (part "select"), `attend` on that
selection (part "attn"), and `attend(select())` (part "total"); dense entries give one "total" row.

Entries:
  * dense SDPA: "sdpa" (utils.attention.dense_attention, what a patched model runs for dense layers; applies
    soft-capping), "sdpa_default" (torch SDPA with GQA, no backend pinned: what transformers' "sdpa" runs),
    "sdpa_flash" / "sdpa_cudnn" (backend pinned, K/V repeated per query head beforehand, untimed);
  * every prefill method of the registry (utils/methods/registry.py), selected exactly as a patched model selects
    (`method.select(q, k, config, context)`, timed as a layer after the first: `layer_contexts`) and attended by
    `utils.attention.sparse_attention`, which picks the Triton kernel on the GPU. "block_sparse" lists whole
    aligned blocks, so it runs through the block kernel;
  * kernel variants of the registry's "dhsa" (GPU timing only; not registry methods because the model cannot run
    them: block selection needs block-aligned query offsets, so decode steps could not use it):
      dhsa_block       block-aligned DHSA (paper App. D 2)): chunk ends snapped to blocks of --block-size keys, top
                       blocks per query block, first and diagonal block always kept; the Triton block kernel;
      dhsa_block_flex  the same selection attended by PyTorch FlexAttention;
      dhsa_sdpa        DHSA on the PyTorch paths (kernels off): selection by topk, executor by gathered SDPA.
  `kernel_config_variants` adds "dhsa_cfgN": DHSA's attention kernel with extra Triton launch configs.

Every sparse output is checked against the PyTorch executor on the same selection (`reference`).
Methods with `dense_prefill` (Quest: sparse only at decode) have no prefill selection and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from utils import kernels
from utils.attention import dense_attention, sparse_attention
from utils.methods.dhsa.boundaries import FixedSizeBoundaries
from utils.config import SparseAttentionConfig
from utils.bench.latency import sdpa_backend
from utils.methods import METHODS, LayerContext
from utils.selection import KernelSelection, Selection, blocks_from_token_selection


@dataclass(frozen=True)
class LayerMethod:
    """One method of the latency table.

    attend(q, k, v, plan, scale, softcap) -> [B, Hq, Lq, D]; q: [B, Hq, Lq, D], k, v: [B, Hkv, Lk, D].
    select(q, k, v, config, context) -> plan: a Selection (or a FlexPlan) for sparse methods, timed; for dense
        methods an untimed preparation of the inputs (or None when there is nothing to prepare). `context` is the
        registry's LayerContext (see `layer_contexts`).
    dense: one "total" row per length, no selection, no reference check.
    softcap: False when the backend cannot apply logit soft-capping: skipped on such shapes (Gemma-2).
    kernels: False to run on the PyTorch paths (kernels.disabled()); timed only up to --max-reference-length.
    cuda_only: needs a CUDA GPU (pinned SDPA backends, Triton block selection).
    """

    name: str
    summary: str
    attend: Callable[..., torch.Tensor]
    select: Callable[..., Any] | None = None
    dense: bool = False
    softcap: bool = True
    kernels: bool = True
    cuda_only: bool = False
    note: str = ""


@dataclass
class FlexPlan:
    """A block selection with its FlexAttention BlockMask (built in `select`, so "attn" times the attention only)."""

    selection: KernelSelection
    block_mask: Any


def plan_selection(plan) -> Selection:
    return plan.selection if isinstance(plan, FlexPlan) else plan


def reference(q, k, v, plan, scale=None, softcap=None) -> torch.Tensor:
    """The PyTorch executor's output on the plan's selection (kernels off): what every sparse output must equal."""
    with kernels.disabled():
        return sparse_attention(q, k, v, plan_selection(plan), scale=scale, softcap=softcap)


def _attend(q, k, v, plan, scale, softcap):
    """sparse_attention on a token or block selection: the Triton kernel on the GPU (the block kernel for a block
    selection), the PyTorch executor on the CPU."""
    return sparse_attention(q, k, v, plan, scale=scale, softcap=softcap)


# --------------------------------------------------------------------------------------------- dense SDPA

def _dense(q, k, v, plan, scale, softcap):
    return dense_attention(q, k, v, scale=scale, softcap=softcap)


def _sdpa_default(q, k, v, plan, scale, softcap):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def _repeat_kv(q, k, v, config, context):
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # dense backends get K/V per query head


def _pinned_sdpa(backend: str):
    def attend(q, k, v, plan, scale, softcap):
        k_rep, v_rep = plan
        with sdpa_backend(backend):
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)
    return attend


# --------------------------------------------------------------------------------------------- registry methods

def layer_contexts():
    """(first, later): LayerContexts of the first sparse layer of a forward and of a later one, sharing `shared`.

    A patched model computes DHSA's chunk boundaries in its first sparse layer and the later layers reuse them
    (share_boundaries, the default). The benchmark makes its untimed first selection with `first` and times
    `later()`, i.e. the cost of a typical layer; with --no-share-boundaries every layer computes them."""
    shared = {}
    return LayerContext(layer_idx=0, shared=shared), lambda: LayerContext(layer_idx=1, shared=shared)


def _registry_select(name: str, to_blocks: bool = False):
    method = METHODS[name]

    def select(q, k, v, config: SparseAttentionConfig, context: LayerContext):
        selection = method.select(q, k, config.replace(method=name), context)
        if to_blocks:  # whole aligned blocks: the block-mode form runs through the block kernel
            selection = blocks_from_token_selection(selection, config.block_size, k.shape[2]) or selection
        return selection
    return select


# --------------------------------------------------------------------------------------------- DHSA kernel variants

def fixed_boundaries(k: torch.Tensor, config: SparseAttentionConfig) -> list[torch.Tensor]:
    """The config's uniform chunk ends for keys k [B, Hkv, L, D] (the block variants take no learned boundaries)."""
    return FixedSizeBoundaries.from_config(config)(k, config.num_chunks(k.shape[2]))


def _dhsa_block_select(q, k, v, config: SparseAttentionConfig, context=None) -> KernelSelection:
    from utils.methods.dhsa.fused import dhsa_block_select  # Triton
    return dhsa_block_select(q, k, budget=config.resolve_budget(k.shape[2]), boundaries=fixed_boundaries(k, config),
                             block_size=config.block_size, options=config.dhsa_options())


def _flex_select(q, k, v, config: SparseAttentionConfig, context=None) -> FlexPlan:
    from utils.kernels.flex import block_mask_from_selection
    selection = _dhsa_block_select(q, k, v, config)
    return FlexPlan(selection, block_mask_from_selection(selection, q.shape[1], q.shape[2], k.shape[2]))


def _flex_attend(q, k, v, plan: FlexPlan, scale, softcap):
    from utils.kernels.flex import flex_block_attention
    return flex_block_attention(q, k, v, plan.selection, scale=scale, block_mask=plan.block_mask)


def kernel_config_variants(configs: list[dict]) -> dict[str, LayerMethod]:
    """"dhsa_cfgN": DHSA's selection, attended by the Triton kernel with launch config N (e.g. rows, block_n,
    num_warps, num_stages); a config that does not compile gives an error row."""
    def attend_with(extra):
        def attend(q, k, v, sel, scale, softcap):
            from utils.kernels.sparse_prefill import sparse_prefill
            counts = sel.counts if getattr(sel, "counts", None) is not None else None
            return sparse_prefill(q, k, v, sel.key_index, counts, query_chunk=sel.query_chunk, q_offset=sel.q_offset,
                                  scale=scale, softcap=softcap, config=extra, sorted_keys=counts is not None)
        return attend
    return {f"dhsa_cfg{i}": LayerMethod(f"dhsa_cfg{i}", f"DHSA, attention kernel config {extra}", attend_with(extra),
                                        _registry_select("dhsa"), cuda_only=True, note=str(extra))
            for i, extra in enumerate(configs)}


# --------------------------------------------------------------------------------------------- the table

def _table() -> dict[str, LayerMethod]:
    table = {
        "sdpa": LayerMethod("sdpa", "dense attention as a patched model runs it (utils.attention)", _dense,
                            dense=True),
        "sdpa_default": LayerMethod("sdpa_default", "torch SDPA with GQA, backend as dispatched", _sdpa_default,
                                    dense=True, softcap=False),
        "sdpa_flash": LayerMethod("sdpa_flash", "torch SDPA pinned to FlashAttention-2", _pinned_sdpa("flash"),
                                  _repeat_kv, dense=True, softcap=False, cuda_only=True),
        "sdpa_cudnn": LayerMethod("sdpa_cudnn", "torch SDPA pinned to cuDNN attention", _pinned_sdpa("cudnn"),
                                  _repeat_kv, dense=True, softcap=False, cuda_only=True),
    }
    for name, method in METHODS.items():
        if method.select is not None and not method.dense_prefill:
            table[name] = LayerMethod(name, method.summary, _attend,
                                      _registry_select(name, to_blocks=name == "block_sparse"))
    table.update(
        dhsa_block=LayerMethod("dhsa_block", "block-aligned DHSA (App. D 2)), Triton block kernel", _attend,
                               _dhsa_block_select, cuda_only=True),
        dhsa_block_flex=LayerMethod("dhsa_block_flex", "block-aligned DHSA through FlexAttention", _flex_attend,
                                    _flex_select, softcap=False, cuda_only=True),
        dhsa_sdpa=LayerMethod("dhsa_sdpa", "DHSA on the PyTorch paths (kernels off)", _attend,
                              _registry_select("dhsa"), kernels=False),
    )
    return table


LAYER_METHODS: dict[str, LayerMethod] = _table()
KERNEL_DEFAULTS = ("sdpa_flash", "sdpa_cudnn", "sdpa_default", "dhsa", "dhsa_block", "dhsa_block_flex",
                   "block_sparse", "dhsa_sdpa")
CPU_DEFAULTS = ("sdpa", "dhsa")

__all__ = ["LayerMethod", "FlexPlan", "LAYER_METHODS", "KERNEL_DEFAULTS", "CPU_DEFAULTS", "kernel_config_variants",
           "reference", "plan_selection", "fixed_boundaries", "layer_contexts"]
