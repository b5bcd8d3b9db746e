"""StreamingLLM (A-shape) and its dilated / strided variants (paper App. D, baselines 1-3).

What each query keeps, with N_b = its budget and s = floor(sink_fraction * N_b) sink keys (paper: 20%):
  streaming          the first s keys (attention sinks) + a local window of the N_b - s most recent keys,
                     the query itself included. With N_b >= L this is dense attention.
  streaming_dilated  the first s keys + a dilated local window of N_b - s keys with interval 1: the query
                     itself, then every other key going back (offsets 0, 2, 4, ...), as MInference's
                     "dilated" pattern (Beltagy et al., 2020).
  streaming_strided  the first s keys + a dense local window of ceil((N_b - s) / 2) keys + a dilated window of
                     floor((N_b - s) / 2) keys (interval 1) right behind it (Child et al., 2019; paper: 20/40/40%).

The pattern depends only on positions, so every head keeps the same keys. Decode: the same rule at the new
position (sinks + the last window), so prefill and decode agree; nothing is stored between calls.

Selection: queries are cut into tiles of `query_chunk`; a tile lists the sinks plus the span of keys its
windows cover, and a per-query rule (`Selection.keep`) keeps only each query's own window, so no query
reads more than N_b keys although a tile lists more.

    .venv/bin/python -m utils.methods.baselines.streaming     # prints the three patterns on 24 tokens
"""

from __future__ import annotations

import math

import torch

from utils.config import SparseAttentionConfig
from utils.methods.registry import AttentionMethod, LayerContext, register
from utils.selection import Selection
from utils.methods.baselines.common import expand_heads, pack_keys

DILATION_INTERVAL = 1  # keys skipped between two kept keys of a dilated window (paper: interval 1)


def sink_count(budget: int, sink_fraction: float) -> int:
    """Initial (sink) tokens among the budget: floor(fraction * N_b)."""
    return min(budget, math.floor(sink_fraction * budget + 1e-9))


def window_offsets(pattern: str, size: int, interval: int = DILATION_INTERVAL) -> torch.Tensor:
    """Distances q_pos - k_pos of the `size` window keys of a query: "local", "dilated" or "strided"."""
    stride = interval + 1
    if pattern == "local":
        return torch.arange(size)
    if pattern == "dilated":
        return torch.arange(size) * stride
    if pattern == "strided":
        n_local = size - size // 2
        dilated = n_local + interval + torch.arange(size // 2) * stride
        return torch.cat([torch.arange(n_local), dilated])
    raise ValueError(f"unknown window pattern {pattern!r}; use local, dilated or strided")


def streaming_selection(num_queries: int, num_keys: int, budget: int, sink_fraction: float, pattern: str,
                        query_chunk: int, batch: int = 1, heads: int = 1, device=None) -> Selection:
    """Sink + window selection for queries at positions num_keys - num_queries .. num_keys - 1.

    Returns a Selection with key_index [batch, heads, n_tiles, K] (a broadcast view: the pattern is the same
    for every head) and a `keep` rule that limits each query to its sinks and its own window.
    """
    budget = min(budget, num_keys)
    sinks = sink_count(budget, sink_fraction)
    offsets = window_offsets(pattern, budget - sinks).to(device)
    span = int(offsets.max()) + 1 if offsets.numel() else 0  # keys from the oldest window key to the query
    in_window = torch.zeros(max(span, 1), dtype=torch.bool, device=device)
    in_window[offsets] = True

    T = max(1, min(query_chunk, num_queries))
    n_tiles = math.ceil(num_queries / T)
    q_offset = num_keys - num_queries
    first = q_offset + torch.arange(n_tiles, device=device) * T                # first query of each tile
    last = torch.clamp(first + T - 1, max=num_keys - 1)                          # last query of each tile
    window = first[:, None] - span + 1 + torch.arange(span + T - 1, device=device)[None, :]
    window = torch.where((window >= sinks) & (window <= last[:, None]), window, -1)
    sink_keys = torch.arange(sinks, device=device).expand(n_tiles, sinks)
    width = min(num_keys, sinks + span + T - 1)
    key_index = pack_keys(torch.cat([sink_keys, window], dim=1), width)

    def keep(q_pos, k_pos):
        distance = q_pos - k_pos
        windowed = (distance >= 0) & (distance < span) & in_window[distance.clamp(0, max(span - 1, 0))]
        return (k_pos < sinks) | windowed

    return Selection(expand_heads(key_index, batch, heads), T, q_offset, keep)


def _select(pattern: str):
    def select(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig, context: LayerContext) -> Selection:
        B, Lq, Lk, Hkv = q.shape[0], q.shape[2], k.shape[2], k.shape[1]
        return streaming_selection(Lq, Lk, config.resolve_budget(Lk), config.sink_fraction, pattern,
                                   config.query_chunk, B, Hkv, q.device)
    return select


register(AttentionMethod("streaming", "StreamingLLM (A-shape): 20% sink tokens + 80% local window",
                         _select("local")))
register(AttentionMethod("streaming_dilated", "StreamingLLM w/ dilated: 20% sinks + 80% dilated window (interval 1)",
                         _select("dilated")))
register(AttentionMethod("streaming_strided",
                         "StreamingLLM w/ strided: 20% sinks + 40% local + 40% dilated window (interval 1)",
                         _select("strided")))

__all__ = ["streaming_selection", "window_offsets", "sink_count", "DILATION_INTERVAL"]


if __name__ == "__main__":
    from utils.methods.baselines.common import ascii_mask

    for name in ("local", "dilated", "strided"):
        print(f"\n{name}: 24 tokens, budget 10, 20% sinks, query_chunk 4  (row: position, keys, count)")
        print(ascii_mask(streaming_selection(24, 24, 10, 0.2, name, 4), 24, 24))
