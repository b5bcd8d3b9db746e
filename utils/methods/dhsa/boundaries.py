"""Where the key chunks of DHSA end (paper §3.1, §3.2): boundary sources and their validation.

Convention: boundaries are chunk END indices, exclusive, ascending: [b_1, ..., b_Nc] with b_Nc = L, so chunk
j spans keys [b_{j-1}, b_j) with b_0 = 0. The paper's "token i is the last token of a chunk" is the end i + 1.

A boundary source maps the keys of one layer to one boundary list per batch item:
    source(keys: [B, Hkv, L, D], max_chunks: int, input_ids: [B, L] | None) -> list[LongTensor]
`FixedSizeBoundaries` (uniform chunks) is the default until learned predictor weights exist for the model;
`PredictorBoundaries` wraps the learned predictor of `boundary_predictor/` (App. B).
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, Sequence

import torch


class BoundarySource(Protocol):
    def __call__(self, keys: torch.Tensor, max_chunks: int, input_ids: torch.Tensor | None = None
                 ) -> list[torch.Tensor]: ...


def as_boundary_list(boundaries, batch: int, num_keys: int, device=None) -> list[torch.Tensor]:
    """Validate user boundaries and return one ascending LongTensor of chunk ends per batch item.

    Accepts a 1-D sequence/tensor (shared by the batch), a 2-D tensor [B, Nc], or a list of 1-D per item.
    The final end L is appended when missing. Raises ValueError on anything that is not a partition of [0, L).
    """
    if isinstance(boundaries, torch.Tensor) and boundaries.dim() == 2:
        items = list(boundaries)
    elif isinstance(boundaries, (list, tuple)) and boundaries and isinstance(boundaries[0], (list, tuple, torch.Tensor)):
        items = list(boundaries)
    else:
        items = [boundaries] * batch
    if len(items) != batch:
        raise ValueError(f"got boundaries for {len(items)} sequences, batch has {batch}")
    out = []
    for ends in items:
        ends = torch.as_tensor(ends, dtype=torch.long, device=device).flatten()
        if ends.numel() == 0 or ends[-1].item() != num_keys:
            ends = torch.cat([ends, torch.tensor([num_keys], dtype=torch.long, device=ends.device)])
        if ends[0].item() <= 0 or ends[-1].item() > num_keys or (ends.numel() > 1 and (ends.diff() <= 0).any()):
            raise ValueError(
                f"boundaries must be strictly increasing chunk ends in (0, {num_keys}], got {ends.tolist()[:8]}...")
        out.append(ends)
    return out


def fixed_size_ends(num_keys: int, chunk_len: int, device=None) -> torch.Tensor:
    """Chunk ends of uniform chunks of `chunk_len` keys (the last one may be shorter)."""
    ends = torch.arange(chunk_len, max(num_keys, chunk_len), chunk_len, device=device)  # none if L <= chunk_len
    return torch.cat([ends, torch.tensor([num_keys], device=device)])


class FixedSizeBoundaries:
    """Uniform chunks: ceil(L / max_chunks) keys each, or exactly `chunk_len` keys if given.

    This is DHSA "w/o dynamic chunking" (Table 4); with chunk_len = block size it is block-sparse's grid.
    """

    def __init__(self, chunk_len: int | None = None):
        self.chunk_len = chunk_len

    @classmethod
    def from_config(cls, config) -> "FixedSizeBoundaries":
        """The config's uniform chunks: `chunk_size` keys each, or `max_chunks` equal chunks when that is set."""
        return cls(None if config.max_chunks is not None else config.chunk_size)

    def __call__(self, keys, max_chunks, input_ids=None):
        L = keys.shape[2]
        chunk_len = self.chunk_len or max(1, math.ceil(L / max_chunks))
        return [fixed_size_ends(L, chunk_len, keys.device)] * keys.shape[0]


class PredictorBoundaries:
    """Boundaries from the learned predictor (App. B.5): scores -> confidence filter -> NMS -> top N_c - 1."""

    def __init__(self, predictor, nms_window: int = 8, min_confidence: float = 0.05,
                 newline_token_ids: Sequence[int] = ()):
        self.predictor = predictor
        self.nms_window = nms_window
        self.min_confidence = min_confidence
        self.newline_token_ids = tuple(newline_token_ids)

    def __call__(self, keys, max_chunks, input_ids=None):
        from boundary_predictor import predict_boundaries

        newline_positions = None
        if self.newline_token_ids and input_ids is not None and input_ids.shape[-1] == keys.shape[2]:
            is_newline = torch.isin(input_ids, torch.tensor(self.newline_token_ids, device=input_ids.device))
            newline_positions = [row.nonzero().flatten() for row in is_newline]
        return predict_boundaries(self.predictor, keys, max_chunks, nms_window=self.nms_window,
                                  min_confidence=self.min_confidence, newline_positions=newline_positions)


def make_boundary_source(config, model_name: str | None = None, tokenizer=None) -> BoundarySource:
    """The boundary source a config asks for: "fixed", "predictor", or "auto" (predictor if weights exist)."""
    if config.boundary_source == "fixed":
        return FixedSizeBoundaries()
    path = config.predictor_path
    if path is None and model_name is not None:
        try:
            from boundary_predictor import default_weights_path
            path = default_weights_path(model_name)
        except ImportError:
            path = None
    if path is None:
        if config.boundary_source == "predictor":
            raise ValueError(f"no boundary-predictor weights for model {model_name!r}: pass --predictor-path, "
                             "or train them with `python -m boundary_predictor.train` (see README)")
        warnings.warn(f"no boundary-predictor weights for {model_name or 'this model'}: DHSA uses fixed-size "
                      "chunks (pass --predictor-path to use learned boundaries)", stacklevel=2)
        return FixedSizeBoundaries()
    from boundary_predictor import load_predictor

    newline_ids = ()
    if config.newline_boundaries and tokenizer is not None:
        vocab = tokenizer.get_vocab()
        newline_ids = tuple(i for t, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([t]))
    return PredictorBoundaries(load_predictor(path), config.nms_window, config.min_confidence, newline_ids)


__all__ = ["BoundarySource", "as_boundary_list", "fixed_size_ends", "FixedSizeBoundaries", "PredictorBoundaries",
           "make_boundary_source"]
