"""Learned boundary predictor of DHSA (paper §3.2, App. B): where the key chunks end.

Engine API (used by utils/methods/dhsa/boundaries.py):
    predictor = load_predictor(path)                      # weights + metadata in one small .pt file
    default_weights_path("gemma-3-270m")                  # boundary_predictor/weights/<model>.pt or None
    ends = predict_boundaries(predictor, keys, max_chunks, nms_window=8, min_confidence=0.05,
                              newline_positions=None)     # keys [B, Hkv, L, D] -> list of B LongTensors
Each result holds ascending chunk END indices (exclusive), the last one L: the paper's "token i is the last
token of a chunk" is the end i + 1. At most max_chunks chunks, each of at least nms_window keys.

Modules: model.py (network), attention_mass.py (labels, eq. 5-8), capture.py (q/k of one LLM forward),
loss.py (eq. 9, metrics), data.py (documents, samples, label cache), labels.py / train.py (CLIs),
inference.py (NMS, weights file).
"""

from .attention_mass import attention_mass_ratios, soft_labels
from .inference import (default_weights_path, load_predictor, model_key, predict_boundaries,
                        save_predictor, select_boundaries)
from .model import BoundaryPredictor, PredictorConfig

__all__ = ["BoundaryPredictor", "PredictorConfig", "load_predictor", "save_predictor", "default_weights_path",
           "predict_boundaries", "select_boundaries", "attention_mass_ratios", "soft_labels",
           "model_key"]
