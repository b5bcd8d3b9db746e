"""The selection testbed: every method and DHSA variant scored on the captured queries and keys of one long prompt,
without a model forward per variant (the CPU long-context testbed of run_selection_testbed.py).

One dense forward of a needle prompt keeps, per layer, every post-RoPE key and the queries of a few windows of
`WINDOW` consecutive queries: `SAMPLED` windows spread over the prompt, and the tail window (the last whole
windows: the question and the position that emits the first answer token). The capture is cached on disk, keyed by
model, prompt and windows. A method is then scored on each window as the last queries of a prefill that ends at
the window's end, with the budget N_b of the whole prompt: exact for every rule whose choice for a tile depends only
on the keys before the tile's end (DHSA, oracle, block_sparse, streaming); the rules that estimate a pattern from
the last queries of the prefill (vertical_slash, flexprefill, xattention) estimate it from the window's own
queries on the sampled windows. DHSA's question-tail options act on the tail window only.

Scores per (window, layer, method), averaged over queries and heads (utils/bench/recall.py): mass_recall, topk_overlap,
keys_read; and on the tail window the needle coverage: the heads whose dense attention gives the needle at least
`NEEDLE_MASS` of their mass, and how many of them keep at least half of it.

A method spec is a registry name with optional config overrides: "dhsa", "dhsa[dense_tail=0]",
"dhsa[exact_tail=64,dense_tail=0]".
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch

from utils.config import SparseAttentionConfig
from utils.bench.recall import dense_tail_rows, read_keys, recall_scores, topk_thresholds, true_attention

WINDOW = 128          # queries per window (a multiple of DHSA's 64-query tiles and of the 128-key blocks)
SAMPLED = 8           # windows spread over the prompt, besides the tail
NEEDLE_MASS = 0.05    # a head "reads the needle" when its dense attention gives the needle this share
NEEDLE_QUERIES = 64   # ... averaged over the last queries of the prompt (the question, the answer's first token)
TAIL_OPTIONS = ("dense_tail", "exact_tail")  # act on the last tiles of a prefill only


def parse_spec(spec: str) -> tuple[str, dict]:
    """"dhsa[dense_tail=0,chunk_size=8]" -> ("dhsa", {"dense_tail": 0, "chunk_size": 8}); values as Python
    literals (ints, floats, True/False, strings)."""
    match = re.fullmatch(r"([A-Za-z0-9_]+)(?:\[(.*)\])?", spec.strip())
    if not match:
        raise ValueError(f"bad method spec {spec!r}; write name or name[field=value,...], e.g. dhsa[dense_tail=0]")
    name, body = match.group(1), match.group(2)
    overrides = {}
    fields = {f for f in SparseAttentionConfig.__dataclass_fields__}
    for part in filter(None, (body or "").split(",")):
        field, _, value = part.partition("=")
        field = field.strip()
        if field not in fields:
            raise ValueError(f"unknown option {field!r} in {spec!r}; options are SparseAttentionConfig fields")
        value = value.strip()
        if value in ("True", "False"):
            overrides[field] = value == "True"
        else:
            try:
                overrides[field] = int(value)
            except ValueError:
                try:
                    overrides[field] = float(value)
                except ValueError:
                    overrides[field] = value
    return name, overrides


def window_starts(length: int, sampled: int = SAMPLED, window: int = WINDOW) -> list[int]:
    """Starts of the sampled windows (evenly from length/8 to the tail, aligned to `window`), then the tail
    window's start, the last one: the tail holds the last `window` queries (up to 2 * window - 1 of them)."""
    tail = max(0, (length - window) // window * window)
    lo, hi = length // 8 // window, tail // window - 1
    picks = sorted({round(lo + i * (hi - lo) / max(1, sampled - 1)) for i in range(sampled)}) if hi > lo else []
    return [p * window for p in picks if p * window < tail] + [tail]


def window_rows(length: int, starts: list[int], window: int = WINDOW) -> list[torch.Tensor]:
    """Query positions of each window (the tail window runs to the end of the prompt)."""
    ends = [s + window for s in starts[:-1]] + [length]
    return [torch.arange(s, e) for s, e in zip(starts, ends)]


def cache_path(cache_dir: Path, model_name: str, input_ids: list[int], starts: list[int]) -> Path:
    digest = hashlib.sha1(repr((list(input_ids), starts, WINDOW)).encode()).hexdigest()[:16]
    return Path(cache_dir) / "testbed" / model_name / f"L{len(input_ids)}_{digest}.pt"


def _exact_causal_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: exact causal attention with K/V repeated per query head, so that fp32 SDPA
    on CUDA takes its memory-efficient kernel (with a mask or grouped heads it falls back to the math kernel,
    an L x L matrix per head: 56 GB at 32K for Qwen2.5-0.5B)."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _exact_attention_on_cuda(model):
    """Switch a model on CUDA to _exact_causal_attention for the capture forward (no change elsewhere)."""
    import contextlib

    if model.device.type != "cuda":
        return contextlib.nullcontext()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("testbed_exact", _exact_causal_attention)
    AttentionMaskInterface.register("testbed_exact", sdpa_mask)

    @contextlib.contextmanager
    def switched():
        before = model.config._attn_implementation
        model.set_attn_implementation("testbed_exact")
        try:
            yield
        finally:
            model.set_attn_implementation(before)
    return switched()


def capture(model, input_ids: list[int], layers: list[int], starts: list[int], path: Path) -> dict:
    """{layer: (q [1, Hq, rows, D] fp32 of every window, k [1, Hkv, L, D] fp32, options)} on the model's device,
    cached at `path`."""
    if path.is_file():
        return torch.load(path, weights_only=False, map_location=model.device)
    from boundary_predictor.capture import capture_queries_and_keys

    rows = torch.cat(window_rows(len(input_ids), starts))
    with _exact_attention_on_cuda(model):
        captured = capture_queries_and_keys(model, torch.tensor([input_ids]), layers, rows=rows)
    data = {layer: (q.float(), k.float(), options) for layer, (q, k, options) in captured.items()}  # model device
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


def window_truth(q: torch.Tensor, k: torch.Tensor, options: dict, budget: int) -> dict:
    """The dense attention of the queries q [1, Hq, n, D] that end a prefill with keys k [1, Hkv, L, D] (L - n is
    the first query's position): logits, probs and the budget-th largest logit per query, computed once per window
    and shared by every method scored on it."""
    logits, probs = true_attention(q, k, options.get("scaling"), options.get("softcap"))
    return {"logits": logits, "probs": probs, "threshold": topk_thresholds(logits, [budget])[budget], "budget": budget}


def score_selection(truth: dict, selection, needle: tuple[int, int] | None = None) -> dict:
    """Scores of one selection against `truth` (window_truth): mass_recall, topk_overlap, keys_read (means over
    queries and heads) and, with `needle` = (first, end) key positions, the needle coverage of the heads that
    read it (needle_heads, needle_heads_half, needle_mass, needle_kept)."""
    logits, probs = truth["logits"], truth["probs"]
    Hq, n, L = probs.shape[1:]
    keys, valid = read_keys(selection, torch.arange(n, device=probs.device))
    scores = recall_scores(logits, probs, keys, valid, truth["threshold"], truth["budget"])
    dense_tail_rows(selection, 0, L - n, scores)
    out = {name: scores[name].mean().item() for name in ("mass_recall", "topk_overlap", "keys_read")}
    if needle is not None:
        lo, hi = needle
        Hs = keys.shape[1]
        inside = valid[0] & (keys[0] >= lo) & (keys[0] < hi)  # [Hs, n, K]: listed keys that hold the needle
        kept = torch.zeros(Hs, n, hi - lo + 1, dtype=torch.bool, device=probs.device)
        kept.scatter_(-1, torch.where(inside, keys[0] - lo, hi - lo), True)
        kept = kept[..., : hi - lo].repeat_interleave(Hq // Hs, dim=0)  # [Hq, n, needle keys]
        if selection.dense_from is not None:
            kept[:, selection.dense_from:] = True  # causality is in probs already
        needle_probs = probs[0, :, -NEEDLE_QUERIES:, lo:hi]
        kept = kept[:, -NEEDLE_QUERIES:]
        mass = needle_probs.sum(-1).mean(-1)  # per head
        kept_mass = (needle_probs * kept).sum(-1).mean(-1)
        reading = mass >= NEEDLE_MASS
        out.update(needle_heads=int(reading.sum()), needle_heads_half=int((kept_mass >= 0.5 * mass)[reading].sum()),
                   needle_mass=float(mass[reading].sum()), needle_kept=float(kept_mass[reading].sum()))
    return out


def dhsa_flop_ratio(length: int, head_dim: int, config: SparseAttentionConfig) -> float:
    """FLOPs of DHSA's selection + attention over those of dense causal attention (per head, prefill of
    `length`, GQA aside): chunk scores of the visible chunks (half of L/chunk_size per query; twice the head dim
    for chunk_score "bound"), token rescoring
    (token_rescore x N_b dot products per query, or per rescoring query), attention on N_b keys (QK and PV), the tails on every key, and
    the ranking of tail_columns (the tail's QK over every key once more)."""
    L, D = length, head_dim
    N = config.resolve_budget(L)
    dense = 2 * L * L * D  # QK + PV, causal: L^2 / 2 pairs, 2 x 2 FLOPs each per dimension
    chunks = L * (config.num_chunks(L) / 2) * 2 * D * (2 if config.chunk_score == "bound" else 1)  # bound: 2D wide
    rescored = min(config.rescore_window, N) if config.rescore_window else N  # slots token rescoring decides
    rescore = L * config.token_rescore * rescored * 2 * D if config.token_rescore else 0.0
    if config.rescore_queries and config.rescore_queries < config.query_chunk:  # a sample of each tile rescores
        rescore *= config.rescore_queries / config.query_chunk
    attend = L * N * 4 * D
    tail = max(config.dense_tail, config.exact_tail) * L * 4 * D
    columns = (max(config.dense_tail, config.exact_tail) or 128) * L * 2 * D if config.tail_columns else 0.0
    return (chunks + rescore + attend + tail + columns) / dense


__all__ = ["parse_spec", "window_starts", "window_rows", "cache_path", "capture", "window_truth", "score_selection", "dhsa_flop_ratio",
           "WINDOW", "SAMPLED", "TAIL_OPTIONS"]
