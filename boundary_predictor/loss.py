"""Training objective and monitoring metrics of the boundary predictor (paper App. B.4).

Loss (eq. 9), focal binary cross-entropy with soft labels y in [0, 1]:
    L_i = (1 - p_t)^gamma * [ -w_pos * y * log p - (1 - y) * log(1 - p) ],   p = sigmoid(z),
with p_t = p * y + (1 - p) * (1 - y), the probability given to the label. The paper prints the focal factor as
(1 - p_i)^gamma, but its text (easy examples are "large p_i for positives, small p_i for negatives") and the
authors' code use p_t, which we follow. gamma = 2, w_pos = 1.3.

Metrics: precision / recall / F1 of the positive class (soft label >= 0.5 is a boundary, predicted probability
>= 0.5 is a predicted boundary) and top-K overlap: |top-K positions by label ∩ top-K by prediction| / K
(K = 500, capped at the number of labelled positions), because inference keeps the top-scoring positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAMMA = 2.0
POS_WEIGHT = 1.3
TOP_K = 500


def focal_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
              gamma: float = GAMMA, pos_weight: float = POS_WEIGHT) -> torch.Tensor:
    """Mean of eq. 9 over the positions where `mask` is True. logits, labels, mask: same shape."""
    labels = labels.to(logits.dtype)
    if mask is None:
        mask = torch.ones_like(labels, dtype=torch.bool)
    labels = torch.where(mask, labels, torch.zeros_like(labels))  # undefined (NaN) labels must not leak
    bce = F.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device),
        reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    loss = (1 - p_t).pow(gamma) * bce
    return loss[mask].sum() / mask.sum().clamp(min=1)


class BoundaryMetrics:
    """Accumulates precision / recall / F1 counts and top-K overlap over (sample, layer) pairs."""

    def __init__(self, k: int = TOP_K):
        self.k = k
        self.tp = self.fp = self.fn = self.positions = self.positives = 0
        self.overlaps: list[float] = []
        self.loss_sum = 0.0
        self.loss_count = 0

    def add_loss(self, loss: float) -> None:
        """One sample's loss (the summary reports the mean over samples)."""
        self.loss_sum += float(loss)
        self.loss_count += 1

    def add(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """logits, labels (soft), mask: [L] or [B, L]; each row is one (sample, layer) sequence."""
        logits, labels, mask = (t.detach().reshape(-1, t.shape[-1]).cpu() for t in (logits, labels, mask))
        for z, y, m in zip(logits, labels, mask):
            z, y = z[m], y[m]
            pred, true = z >= 0, y >= 0.5          # logit >= 0  <=>  probability >= 0.5
            self.tp += int((pred & true).sum())
            self.fp += int((pred & ~true).sum())
            self.fn += int((~pred & true).sum())
            self.positions += int(m.sum())
            self.positives += int(true.sum())
            if z.numel():
                k = min(self.k, z.numel())
                top_label = set(torch.topk(y, k).indices.tolist())
                top_pred = set(torch.topk(z, k).indices.tolist())
                self.overlaps.append(len(top_label & top_pred) / k)

    def summary(self) -> dict:
        precision = self.tp / max(1, self.tp + self.fp)
        recall = self.tp / max(1, self.tp + self.fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "loss": self.loss_sum / max(1, self.loss_count),
            "precision": precision, "recall": recall, "f1": f1,
            "topk_overlap": sum(self.overlaps) / max(1, len(self.overlaps)),
            "positive_rate": self.positives / max(1, self.positions),
            "positions": self.positions,
        }


__all__ = ["focal_bce", "BoundaryMetrics", "GAMMA", "POS_WEIGHT", "TOP_K"]
