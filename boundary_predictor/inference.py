"""From predictor scores to DHSA chunk boundaries (paper App. B.5), and the weights file.

Convention: the result for one sequence is the ascending chunk END indices (exclusive) [b_1, ..., b_Nc] with
b_Nc = L; chunk j spans keys [b_{j-1}, b_j), b_0 = 0. The predictor scores "position i is the last token of a
chunk"; such a boundary is the chunk end i + 1.

Selection: scores for all positions -> keep positions with score >= min_confidence -> visit them by descending
score and keep one unless it lies closer than `nms_window` positions to one already kept, where the sequence
ends count as kept (b_0 = 0 and b_Nc = L are boundaries, App. B.3) -> stop at max_chunks - 1 boundaries. So
every chunk has at least nms_window keys (unless L itself is shorter). Optional newline positions are visited
first (they are always candidates) and go through the same NMS and cap. Predictor candidates are positions
w .. L-1-w, where both windows lie inside the sequence, as in training (labels.py leaves the others unlabelled).

Weights file (`.pt`, loaded with weights_only=True): {"format", "config" (PredictorConfig), "state_dict",
"metadata" (model name, layers, label settings, training command, validation metrics, ...)}.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .model import BoundaryPredictor, PredictorConfig

FORMAT = "dhsa-boundary-predictor/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def model_key(name_or_path: str) -> str:
    """File-name key of a model: "google/gemma-3-270m" or "/x/gemma-3-270m/" -> "gemma-3-270m"."""
    name = str(name_or_path).rstrip("/\\").replace("\\", "/").split("/")[-1].lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name)


def default_weights_path(model_name: str, weights_dir: str | Path | None = None) -> Path | None:
    """The shipped weights `boundary_predictor/weights/<model-name>.pt` for a model, or None if absent."""
    path = Path(weights_dir or WEIGHTS_DIR) / f"{model_key(model_name)}.pt"
    return path if path.is_file() else None


def save_predictor(predictor: BoundaryPredictor, path: str | Path, metadata: dict | None = None) -> Path:
    """Write weights + config + metadata to one small file (fp32 tensors); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float().contiguous() for k, v in predictor.state_dict().items()}
    blob = {"format": FORMAT, "config": predictor.config.to_dict(), "state_dict": state, "metadata": metadata or {}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> BoundaryPredictor:
    """Load a predictor saved by `save_predictor`, in eval mode; its metadata is at `predictor.metadata`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no boundary-predictor weights at {path}; train them with "
                                "`python -m boundary_predictor.train --model NAME --out PATH`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a boundary-predictor weights file (expected format {FORMAT})")
    predictor = BoundaryPredictor(PredictorConfig(**blob["config"]))
    predictor.load_state_dict(blob["state_dict"])
    predictor.metadata = blob.get("metadata", {})
    return predictor.to(device).eval()


def select_boundaries(scores: torch.Tensor, max_chunks: int, *, nms_window: int = 8, min_confidence: float = 0.05,
                      first_candidate: int = 0, last_candidate: int | None = None,
                      forced: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ends for one sequence from per-position scores [L] (see the module docstring).

    first_candidate / last_candidate: the range of scored positions that may end a chunk (default 0 .. L-2);
    forced: positions visited first (newlines), from anywhere in 0 .. L-2.
    Returns an ascending LongTensor of at most max_chunks ends, the last one L.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be [L], got {tuple(scores.shape)}")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    if nms_window < 0:
        raise ValueError(f"nms_window must be >= 0, got {nms_window}")
    L = scores.shape[0]
    last = L - 2 if last_candidate is None else min(last_candidate, L - 2)
    scores = scores.detach().float().cpu()
    position = torch.arange(L)
    candidate = (scores >= min_confidence) & (position >= first_candidate) & (position <= last)
    priority = scores.clone()
    if forced is not None and forced.numel():
        forced = forced.detach().long().cpu().flatten()
        forced = forced[(forced >= 0) & (forced <= L - 2)]  # explicit cuts need no right window
        candidate[forced] = True
        priority[forced] += 2.0  # scores are <= 1: newlines come first, by score among themselves
    chosen: list[int] = []
    if max_chunks > 1:
        order = position[candidate][torch.argsort(priority[candidate], descending=True, stable=True)]
        reach = max(nms_window - 1, 0)
        blocked = bytearray(L)
        # the sequence ends are boundaries too: no end i + 1 within nms_window of 0 or of L
        blocked[:reach] = b"\x01" * min(reach, L)
        blocked[max(0, L - 1 - reach):] = b"\x01" * (L - max(0, L - 1 - reach))
        for i in order.tolist():
            if blocked[i]:
                continue
            chosen.append(i)
            if len(chosen) == max_chunks - 1:
                break
            lo, hi = max(0, i - reach), min(L, i + reach + 1)
            blocked[lo:hi] = b"\x01" * (hi - lo)
    ends = torch.tensor(sorted(chosen), dtype=torch.long) + 1
    return torch.cat([ends, torch.tensor([L], dtype=torch.long)])


def predict_boundaries(predictor: BoundaryPredictor, keys: torch.Tensor, max_chunks: int, *, nms_window: int = 8,
                       min_confidence: float = 0.05, newline_positions=None, tile: int = 4096) -> list[torch.Tensor]:
    """Chunk ends per batch item from one layer's keys.

    keys: [B, Hkv, L, D] post-RoPE keys. newline_positions: None, or per batch item a 1-D tensor/list of token
    positions i whose token holds a newline (the chunk then ends after it, at i + 1). Returns a list of B
    ascending LongTensors (on keys.device) of at most max_chunks chunk ends, the last one L.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, L, D], got {tuple(keys.shape)}")
    B, L = keys.shape[0], keys.shape[2]
    if newline_positions is not None and len(newline_positions) != B:
        raise ValueError(f"newline_positions has {len(newline_positions)} items, the batch has {B}")
    param = next(predictor.parameters())
    if param.device != keys.device:
        predictor.to(keys.device)
    scores = predictor.scores(keys, tile=tile)
    w = predictor.config.window
    out = []
    for b in range(B):
        forced = None if newline_positions is None else torch.as_tensor(newline_positions[b], dtype=torch.long)
        ends = select_boundaries(scores[b], max_chunks, nms_window=nms_window, min_confidence=min_confidence,
                                 first_candidate=w, last_candidate=L - 1 - w, forced=forced)
        out.append(ends.to(keys.device))
    return out


__all__ = ["load_predictor", "save_predictor", "default_weights_path", "predict_boundaries",
           "select_boundaries", "model_key", "WEIGHTS_DIR"]
