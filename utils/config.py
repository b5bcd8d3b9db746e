"""Every option of the sparse attention methods, in one dataclass with the paper's defaults.

Command-line flags map onto the fields one to one (`--query-chunk 256` sets `query_chunk`), through
`utils.runs.cli.add_config_args` and `config_from_args`, so every runner exposes the same options under the same
names; the rules for resuming results written before a field existed live in utils/runs/records.py.
`DHSAOptions` is the part of the config that DHSA's key selection reads, as one frozen value
(`config.dhsa_options()`), so that the selection, its GPU kernel and the latency benchmark take one argument.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Options shared by all attention methods (dense, dhsa and the baselines).

    Frozen: every layer of a patched model holds the same config, so a change is a new value
    (`config.replace(density=x)`), never an edit that all layers would see. Fields by group: generic, DHSA (the
    DHSAOptions fields and its boundaries), layers, baselines.

    Budget: each query reads at most N_b keys. Give N_b directly (`budget`) or as a token density N_b / L
    (`density`, the paper's knob: 6.25%, 12.5%, 25%). `min_budget` is a floor (the paper keeps 512 keys at 1K).
    """

    method: str = "dhsa"
    density: float | None = 0.125          # N_b / L (Table 2 uses 12.5%)
    budget: int | None = None              # N_b in keys; overrides density
    min_budget: int = 0                    # floor on N_b
    query_chunk: int = 64                  # queries that share one key selection (App. D "query chunk"; see README)
    decode: str = "dense"                  # decode steps: "dense" (sparse prefill only, the authors' evaluation) or
                                           # "sparse" (Algorithm 2: each new token reads at most N_b keys)

    # DHSA (§3, App. B.5, D)
    chunk_size: int = 16                   # mean key-chunk length: N_c = ceil(L / chunk_size) (authors: L/128*8)
    max_chunks: int | None = None          # N_c directly; overrides chunk_size
    boundary_source: str = "auto"          # "auto": learned predictor if weights exist, else "fixed"
    predictor_path: str | None = None      # boundary-predictor weights (default: shipped weights for the model)
    nms_window: int = 8                    # NMS window of the boundary predictor (App. B.5; 64 for long spans)
    min_confidence: float = 0.05           # predictor scores below this are never boundaries
    newline_boundaries: bool = False       # also cut after newline tokens (App. B.5)
    robust_chunk_repr: bool = True         # sqrt(len)/len * sum (eq. 4); False: plain mean (ablation)
    sink_tokens: int = 64                  # first keys always kept (authors' code: the first 128-key block)
    local_tokens: int = 128                # most recent keys before a query chunk's end always kept (authors: the
                                           # diagonal block); with query_chunk 64 every query reads >= 64 before it
    share_boundaries: bool = True          # one boundary set per forward, from the first sparse layer (App. D)
    share_heads: bool = False              # one selection for all heads (authors' code) instead of per KV head
    query_pooling: str = "max"             # a query chunk scores key chunks by its best query ("max") or mean query
                                           # ("mean"); "softmax_max" / "softmax_mean": per-query chunk probabilities
    center_keys: bool = True               # centre keys on their causal mean before chunk scoring (see README)
    chunk_score: str = "mean"              # a chunk's score: its chunk vector (eq. 4, "mean") or the bound on its best
                                           # key from per-chunk key max / min ("bound", as Quest's pages)
    head_pooling: str = "none"             # "none": every query head selects its own keys; "mean" / "max": the heads
                                           # of a GQA group share one selection (summed queries / best head)
    token_rescore: float = 3.0             # hierarchical refinement: the best chunks' keys, token_rescore x N_b of
                                           # them (x rescore_window with a window), are rescored key by key by the
                                           # tile's queries; 0: chunk scores only (testbed round 12, README)
    rescore_queries: int = 4               # queries of a tile that do the token rescoring (evenly spaced, its last
                                           # query included); 0: all of them
    rescore_window: int = 512              # token rescoring decides only the last rescore_window slots (among the
                                           # next token_rescore x rescore_window keys by chunk score); 0: all slots
    exact_tail: int = 0                    # prefill: the tiles holding the last exact_tail queries (the question,
                                           # the first answer token) rescore every visible key; 0: off
    dense_tail: int = 128                  # prefill: the tiles holding the last dense_tail queries (the question, the
                                           # first answer token) read every visible key (the authors' instruction
                                           # tail; the one exception to the N_b budget); 0: off
    tail_columns: float = 0.0              # prefill: share of every tile's scored budget (after sinks and local
                                           # window) kept for the keys the prompt's last queries attend to most
                                           # (vertical columns shared by every tile, as the authors' DHSA_vs); 0: off

    # layers
    dense_layers: tuple[int, ...] = ()     # layer indices that stay dense

    # baselines (Appendix D, "Baselines")
    block_size: int = 128                  # block_sparse block length
    sink_fraction: float = 0.2             # streaming*: share of the budget given to initial tokens
    last_q: int = 64                       # vertical_slash: queries that estimate the pattern
    page_size: int = 16                    # quest: keys per page
    # flexprefill / xattention: defaults are the authors' code as they run it (README "Peers")
    peer_budget: str = "adaptive"          # "adaptive": their thresholds alone size each tile (no cap; the density
                                           # and budget are unused, the density reached is recorded); "matched":
                                           # at most floor(N_b / 128) blocks per tile (refused at <= 2 blocks)
    flex_gamma: float = 0.9                # flexprefill: attention mass the kept blocks must cover (gamma)
    flex_tau: float = 0.1                  # flexprefill: sqrt-JS divergence below which a head is query-aware (tau)
    flex_min_budget: int = 1024            # flexprefill: at least this many tokens of vertical and of slash blocks
                                           # (their RULER/InfiniteBench scripts: 1024); 0: none
    flex_rule: str = "official"            # flexprefill counting: "official" (tokens // 128 + 1 blocks with the
                                           # forced one, query-aware cover cumsum <= gamma) or "paper" (smallest
                                           # set reaching gamma, ceil(tokens / 128) blocks besides the forced one)
    xattn_threshold: float = 0.8           # xattention: share of a block row's antidiagonal score kept (their
                                           # Xattention_prefill default; their Llama runs use tuned per-head values)
    xattn_stride: int = 16                 # xattention: antidiagonal stride S (their LLM default; paper: 8 or 16)
    xattn_rule: str = "official"           # xattention counting: "official" (their code: one block past the
                                           # threshold in the first 16K-ish queries, block 0 kept) or "paper"

    def __post_init__(self) -> None:
        if self.density is not None and not (0.0 < self.density <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {self.density}; e.g. --density 0.0625")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be a positive number of keys, got {self.budget}")
        if self.density is None and self.budget is None and self.method != "dense":
            raise ValueError("give a budget (--budget N_b) or a density (--density N_b/L)")
        for name in ("query_chunk", "chunk_size", "block_size", "page_size", "last_q"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {self.max_chunks}")
        if self.min_budget < 0 or self.sink_tokens < 0 or self.local_tokens < 0:
            raise ValueError("min_budget, sink_tokens and local_tokens must be >= 0")
        if not 0.0 <= self.sink_fraction <= 1.0:
            raise ValueError(f"sink_fraction must be in [0, 1], got {self.sink_fraction}")
        if self.query_pooling not in ("max", "mean", "softmax_max", "softmax_mean"):
            raise ValueError(f"query_pooling must be max, mean, softmax_max or softmax_mean, got "
                             f"{self.query_pooling!r}")
        if self.decode not in ("dense", "sparse"):
            raise ValueError(f"decode must be dense or sparse, got {self.decode!r}; e.g. --decode sparse")
        if self.method == "quest":  # Quest acts only at decode (prefill stays dense): its decode is always sparse
            object.__setattr__(self, "decode", "sparse")  # normalised once, in the constructor (frozen)
        if self.method == "dense":  # nothing is sparse: one protocol, so dense runs are shared by both
            object.__setattr__(self, "decode", "dense")
        if self.head_pooling not in ("max", "mean", "none"):
            raise ValueError(f"head_pooling must be max, mean or none, got {self.head_pooling!r}")
        if self.token_rescore != 0 and self.token_rescore < 1 or self.exact_tail < 0 or self.dense_tail < 0:
            raise ValueError(f"token_rescore must be 0 (off) or >= 1 (candidates per kept key), exact_tail and "
                             f"dense_tail >= 0; got {self.token_rescore}, {self.exact_tail}, {self.dense_tail}; "
                             "e.g. --token-rescore 4 --exact-tail 64 --dense-tail 0")
        self.dhsa_options()  # DHSA's own checks (rescore_queries, tail_columns, ...) when the config is made
        if self.predictor_path is not None and not os.path.isfile(self.predictor_path):
            raise ValueError(f"no boundary-predictor weights at {self.predictor_path}; pass an existing file or "
                             "train one with `python -m boundary_predictor.train --model NAME --out PATH`")
        if self.boundary_source not in ("auto", "fixed", "predictor"):
            raise ValueError(f"boundary_source must be auto, fixed or predictor, got {self.boundary_source!r}")
        if not (0.0 < self.flex_gamma <= 1.0 and 0.0 < self.xattn_threshold <= 1.0):
            raise ValueError(f"flex_gamma and xattn_threshold must be in (0, 1], got {self.flex_gamma}, "
                             f"{self.xattn_threshold}; e.g. --flex-gamma 0.9")
        if self.peer_budget not in ("adaptive", "matched"):
            raise ValueError(f"peer_budget must be adaptive or matched, got {self.peer_budget!r}; "
                             "e.g. --peer-budget matched")
        if self.flex_rule not in ("official", "paper") or self.xattn_rule not in ("official", "paper"):
            raise ValueError(f"flex_rule and xattn_rule must be official or paper, got {self.flex_rule!r}, "
                             f"{self.xattn_rule!r}; e.g. --flex-rule paper")
        if self.flex_min_budget < 0:
            raise ValueError(f"flex_min_budget must be >= 0 tokens, got {self.flex_min_budget}")
        if self.flex_tau < 0 or self.xattn_stride < 1:
            raise ValueError(f"flex_tau must be >= 0 and xattn_stride >= 1, got {self.flex_tau}, {self.xattn_stride}")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

    def resolve_budget(self, num_keys: int) -> int:
        """N_b for a sequence of `num_keys` keys: budget, else ceil(density * L), floored by min_budget."""
        if self.budget is not None:
            n = self.budget
        elif self.density is not None:
            n = math.ceil(self.density * num_keys - 1e-9)
        else:
            n = num_keys
        return max(1, min(num_keys, max(n, self.min_budget)))

    def num_chunks(self, num_keys: int) -> int:
        """N_c, the most key chunks a sequence of `num_keys` keys is cut into."""
        if self.max_chunks is not None:
            return max(1, min(self.max_chunks, num_keys))
        return max(1, math.ceil(num_keys / self.chunk_size))

    def dhsa_options(self) -> "DHSAOptions":
        """The DHSA selection options of this config (the fields of DHSAOptions, by name)."""
        return DHSAOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DHSAOptions)})

    def replace(self, **changes) -> "SparseAttentionConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(config_field_names())}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DHSAOptions:
    """The options of DHSA's key selection (utils/methods/dhsa/select.py `dhsa_select` and its GPU kernel), as one value.

    Every field is the SparseAttentionConfig field of the same name, with the same default and meaning (see
    there); build it from a config with `config.dhsa_options()`. The budget N_b and the chunk boundaries depend
    on the sequence, so they are arguments of the selection, not options.
    """

    query_chunk: int = SparseAttentionConfig.query_chunk
    robust_chunk_repr: bool = SparseAttentionConfig.robust_chunk_repr
    sink_tokens: int = SparseAttentionConfig.sink_tokens
    local_tokens: int = SparseAttentionConfig.local_tokens
    share_heads: bool = SparseAttentionConfig.share_heads
    query_pooling: str = SparseAttentionConfig.query_pooling
    head_pooling: str = SparseAttentionConfig.head_pooling
    center_keys: bool = SparseAttentionConfig.center_keys
    chunk_score: str = SparseAttentionConfig.chunk_score
    token_rescore: float = SparseAttentionConfig.token_rescore
    rescore_queries: int = SparseAttentionConfig.rescore_queries
    rescore_window: int = SparseAttentionConfig.rescore_window
    exact_tail: int = SparseAttentionConfig.exact_tail
    dense_tail: int = SparseAttentionConfig.dense_tail
    tail_columns: float = SparseAttentionConfig.tail_columns

    def __post_init__(self) -> None:
        if self.query_chunk < 1 or self.sink_tokens < 0 or self.local_tokens < 0:
            raise ValueError(f"query_chunk must be >= 1, sink_tokens and local_tokens >= 0; got {self.query_chunk}, "
                             f"{self.sink_tokens}, {self.local_tokens}")
        if self.query_pooling not in ("max", "mean", "softmax_max", "softmax_mean"):
            raise ValueError(f"query_pooling must be max, mean, softmax_max or softmax_mean, got "
                             f"{self.query_pooling!r}")
        if self.head_pooling not in ("max", "mean", "none"):
            raise ValueError(f"head_pooling must be max, mean or none, got {self.head_pooling!r}")
        if self.chunk_score not in ("mean", "bound"):
            raise ValueError(f"chunk_score must be mean or bound, got {self.chunk_score!r}; e.g. --chunk-score bound")
        if self.token_rescore != 0 and self.token_rescore < 1 or self.exact_tail < 0 or self.dense_tail < 0:
            raise ValueError(f"token_rescore must be 0 or >= 1, exact_tail and dense_tail >= 0; got "
                             f"{self.token_rescore}, {self.exact_tail}, {self.dense_tail}")
        if self.rescore_window < 0:
            raise ValueError(f"rescore_window must be >= 0 (0: every slot), got {self.rescore_window}; "
                             "e.g. --rescore-window 512")
        if self.rescore_queries < 0:
            raise ValueError(f"rescore_queries must be >= 0 (0: every query of a tile), got {self.rescore_queries}; "
                             "e.g. --rescore-queries 16")
        if not 0.0 <= self.tail_columns <= 1.0:
            raise ValueError(f"tail_columns must be in [0, 1], got {self.tail_columns}; e.g. --tail-columns 0.25")

    def replace(self, **changes) -> "DHSAOptions":
        return dataclasses.replace(self, **changes)


def config_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SparseAttentionConfig)]


__all__ = ["SparseAttentionConfig", "DHSAOptions", "config_field_names"]
