"""DHSA, the paper's method, in one folder; this file registers it: what a patched model's attention layer adds to
`dhsa_select`.

    select.py       the selection (Algorithm 1 per query tile; Algorithm 2's decode step) and dhsa_attention
    scores.py       its chunk and score arithmetic (chunk vectors, max-pooled chunk scores, forced keys)
    boundaries.py   boundary sources: the learned predictor (boundary_predictor/) or fixed-size chunks
    fused.py        the same selection on the GPU (Triton; imported only on CUDA, by select.try_fused_select)


Registers "dhsa" and the two ablations of Table 4: "dhsa_no_robust_repr" (plain mean chunk vectors) and
"dhsa_fixed_chunks" (uniform chunks instead of learned boundaries). Per layer call:
  * prefill: chunk boundaries from the model's boundary source (the learned predictor, else uniform chunks); with
    share_boundaries the first sparse layer of a forward computes them and the later layers reuse them;
  * decode step (one query, Algorithm 2): the prompt's chunks are remembered in the layer's `context.state`, the
    tokens generated so far form one more chunk and the current token its own, and the generated tokens are kept
    without scoring, and so are the keys to which the prompt's question tail gave the most attention (ranked once
    at the prefill, `tail_key_ranking`, as SnapKV's observation window does), within the budget. Only reached with
    `decode="sparse"`; with "dense" `run_method` runs decode steps dense. On the CPU the prompt's chunk vectors are
    kept in the state from step to step (`decode_cache`, utils.methods.dhsa.select.DecodeChunks), not recomputed
    over the cache;
  * with `tail_columns`, the prefill's tiles also keep the best of those keys (vertical columns shared by every tile).
The selection options come from the config in one piece, `config.dhsa_options()`.
"""

from __future__ import annotations

import os

from utils.config import SparseAttentionConfig
from utils.methods.dhsa.boundaries import FixedSizeBoundaries, as_boundary_list, make_boundary_source
from utils.methods.dhsa.scores import decode_boundaries
from utils.methods.dhsa.select import dhsa_select, tail_key_ranking
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection


def _prompt_boundaries(keys, config: SparseAttentionConfig, context: LayerContext, dynamic: bool):
    """Chunk ends for a prefill; with share_boundaries the first sparse layer of a forward computes them and
    the later layers of the same forward reuse them (the layers run in increasing index order)."""
    L = keys.shape[2]
    source = context.boundary_source if context.boundary_source is not None else context.shared.get("boundary_source")
    source = source if dynamic else None
    if source is None:
        source = FixedSizeBoundaries.from_config(config)
    shared = context.shared.get("boundaries")
    if config.share_boundaries and shared is not None and shared[0] < context.layer_idx and shared[1] == L \
            and shared[2] == keys.shape[0]:
        return shared[3]
    ends = as_boundary_list(source(keys, config.num_chunks(L), context.shared.get("input_ids")),
                            keys.shape[0], L, device=keys.device)
    if config.share_boundaries:
        context.shared["boundaries"] = (context.layer_idx, L, keys.shape[0], ends)
    return ends


def _dhsa(robust: bool | None, dynamic: bool):
    """The selection rule of a DHSA variant. robust: None follows config.robust_chunk_repr, True/False forces it;
    dynamic: False ignores the model's boundary source (uniform chunks of config.chunk_size)."""
    def select(q, k, config: SparseAttentionConfig, context: LayerContext) -> Selection:
        options = config.dhsa_options()
        if robust is not None:
            options = options.replace(robust_chunk_repr=robust)
        Lq, Lk = q.shape[2], k.shape[2]
        state = context.state.get("dhsa")
        if Lq == 1 and Lk > 1:  # decode step, Algorithm 2
            if state is None or state["prompt_len"] >= Lk or state["batch"] != k.shape[0]:
                ends = _prompt_boundaries(k[:, :, : Lk - 1], config, context, dynamic)
                state = {"prompt_len": Lk - 1, "ends": ends, "batch": k.shape[0]}
                context.state["dhsa"] = state
            ends = [decode_boundaries(e, state["prompt_len"], Lk) for e in state["ends"]]
            # Every decode step reads the tokens generated so far (the current one included) and the local window
            # before them, as always-kept keys (capped at half of N_b like every local window), and the keys the
            # prompt's question read most (its tail's attention, kept from the prefill), as many as fit.
            options = options.replace(local_tokens=max(options.local_tokens, Lk - state["prompt_len"]))
            # the chunk vectors of the prompt, kept from step to step (dhsa.DecodeChunks, CPU)
            cache = state.setdefault("decode_cache", {"prompt_len": state["prompt_len"], "prompt_ends": state["ends"],
                                                      "chunks": {}})
            return dhsa_select(q, k, budget=config.resolve_budget(Lk), boundaries=ends, options=options,
                               ranked_keys=state.get("question_keys"), decode_cache=cache)
        ends = _prompt_boundaries(k, config, context, dynamic)
        context.state["dhsa"] = {"prompt_len": Lk, "ends": ends, "batch": k.shape[0]}
        tail = max(options.dense_tail, options.exact_tail)
        columns = None
        if Lq > 1 and ((config.decode == "sparse" and tail) or options.tail_columns):
            columns = context.state.get("column_keys")  # given by a caller that scores windows of a longer prompt
            if columns is None:
                columns = question_keys(q, k, options, config.resolve_budget(Lk))
            if config.decode == "sparse":
                context.state["dhsa"]["question_keys"] = columns
        return dhsa_select(q, k, budget=config.resolve_budget(Lk), boundaries=ends, options=options,
                           ranked_keys=columns if options.tail_columns else None, ranked_share=options.tail_columns)
    return select


def question_keys(q, k, options, budget: int):
    """The N_b keys the last queries of a prefill (the question tail: dense_tail or exact_tail of them, else
    COLUMN_QUERIES) attend to most, per selecting head, best first (utils.methods.dhsa.select.tail_key_ranking)."""
    tail = max(options.dense_tail, options.exact_tail) or COLUMN_QUERIES
    heads = 1 if options.share_heads else q.shape[1] if options.head_pooling == "none" else k.shape[1]
    return tail_key_ranking(q[:, :, -tail:], k, budget, heads)


COLUMN_QUERIES = 128  # queries that rank the columns when the prefill has no question tail


def _model_name(model_config) -> str | None:
    path = getattr(model_config, "_name_or_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else None


def _remember_input_ids(model, shared: dict) -> None:
    """Keep the prompt's token ids where boundary sources can read them (for newline boundaries)."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            shared["input_ids"] = ids
    if not getattr(model, "_dhsa_input_ids_hook", None):
        model._dhsa_input_ids_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def setup(model, config: SparseAttentionConfig, shared: dict, tokenizer=None) -> None:
    """Once per patch (AttentionMethod.setup): the model's boundary source into `shared["boundary_source"]` (the
    learned predictor for this model if its weights exist, else fixed-size chunks; utils/methods/dhsa/boundaries.py),
    and with newline_boundaries a hook that keeps the prompt's token ids in `shared["input_ids"]`. For a model loaded
    with attn_implementation="dhsa" and never patched, `model` is an attention layer (only its `.config` is read)."""
    shared["boundary_source"] = make_boundary_source(config, _model_name(model.config), tokenizer)
    if config.newline_boundaries:
        _remember_input_ids(model, shared)


register(AttentionMethod("dhsa", "DHSA: dynamic chunks, length-normalised chunk scores, token top-N_b per query chunk",
                         _dhsa(robust=None, dynamic=True), setup=setup))
register(AttentionMethod("dhsa_no_robust_repr", "DHSA ablation: plain mean chunk vectors (Table 4)",
                         _dhsa(robust=False, dynamic=True), setup=setup))
register(AttentionMethod("dhsa_fixed_chunks", "DHSA ablation: uniform chunks instead of learned boundaries (Table 4)",
                         _dhsa(robust=True, dynamic=False), setup=setup))
