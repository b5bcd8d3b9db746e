"""Automatic boundary labels from attention (paper App. B.3, eq. 5-8), computed exactly without an L x L matrix.

For a position i (candidate "last token of a chunk") and window w, eq. 5-6 average, over the future queries
u = i+w+1 .. L-1, the attention mass that lands on the past window v in [i-w+1, i] and on the future window
v in [i+1, i+w]; eq. 7 takes their ratio r_i = (max + eps) / (min + eps) and eq. 8 maps it to a soft label
p = sigmoid(alpha * (log(r + zeta) - beta)). A is the layer's attention matrix averaged over its query heads
(as the authors do), with the layer's own causal / sliding-window mask, scaling and logit soft-capping.

Exactness without L x L: for a key v, the mass from queries u >= t is  colsum(v) - sum_{v <= u < t} A[u, v].
For every window key the cut-off t = i+w+1 is less than 2w rows below v, so the column sums of A plus the
band A[v + d, v], d < 2w, next to the diagonal give eq. 5-6 exactly. Both are accumulated over tiles of
queries (softmax in fp32, sums in fp64), so memory is O(tile * L), never O(L^2).

Edges (where eq. 5-6 are undefined or uninformative): the label of position i is defined when
  * L-1-i-w >= min_future: at least `min_future` future queries (default w; eq. 5's normaliser 1/(L-1-i-w) is
    <= 0 at the very end, and a handful of queries is noise), so the last 2w positions have no label;
  * i >= w: the past window does not hold token 0, the attention sink, whose mass makes r_i large (label
    ~0.95) at i < w whatever the text.
Undefined positions get ratio NaN and are left out of the loss and the metrics.
"""

from __future__ import annotations

import math

import torch

WINDOW = 4          # w (App. B.3)
EPSILON = 1e-3      # eps of eq. 7
ALPHA = 2.0         # eq. 8 slope
BETA = math.log(2.0)  # eq. 8 offset (the paper's "lg(2.0) with base e"): ratio 2 <-> label 0.5
ZETA = 1e-6         # eq. 8 stabiliser

# Upper bound on the elements of one tile of attention probabilities (fp32): 2^26 = 256 MiB.
DEFAULT_TILE_ELEMENTS = 1 << 26


def _tile_probs(q_tile, k, u0, scaling, sliding_window, softcap):
    """Head-averaged attention probabilities of a query tile over keys 0..u_end-1: [B, T, u_end].

    q_tile: [B, Hkv, g, T, D] fp32, the g query heads of each key head (GQA), queries u0 .. u0+T-1.
    """
    B, Hkv, g, T, D = q_tile.shape
    u_end = u0 + T
    logits = torch.matmul(q_tile.reshape(B, Hkv, g * T, D), k[:, :, :u_end].float().transpose(-1, -2))
    logits = logits.view(B, Hkv, g, T, u_end).mul_(scaling)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    q_pos = torch.arange(u0, u_end, device=k.device).view(T, 1)
    k_pos = torch.arange(u0, u_end, device=k.device)
    logits[..., u0:].masked_fill_(k_pos > q_pos, float("-inf"))  # only the diagonal block has future keys
    if sliding_window is not None:
        too_old = q_pos - torch.arange(u_end, device=k.device) >= sliding_window
        logits.masked_fill_(too_old, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    del logits
    return probs.mean(dim=(1, 2))  # average over all Hq = Hkv * g query heads


def attention_mass_ratios(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float | None = None,
    window: int = WINDOW,
    eps: float = EPSILON,
    min_future: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> torch.Tensor:
    """Attention-mass ratios r_i of eq. 7 for every position, NaN where undefined.

    query: [B, Hq, L, D] and key: [B, Hkv, L, D], post-RoPE, one layer, no padding, Hq a multiple of Hkv.
    scaling: logit scale (default 1/sqrt(D)); sliding_window: keys with u - v >= sliding_window are masked;
    softcap: tanh soft-capping of logits (Gemma-2). Returns float32 [B, L].
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, L, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    B, Hq, L, D = query.shape
    Hkv = key.shape[1]
    if key.shape[0] != B or key.shape[2] != L or key.shape[3] != D:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not match")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    w = window
    min_future = w if min_future is None else max(1, min_future)
    scaling = 1.0 / math.sqrt(D) if scaling is None else scaling
    device = key.device

    q = query.view(B, Hkv, Hq // Hkv, L, D)  # the g query heads of a GQA group next to their key head
    col_sum = torch.zeros(B, L, dtype=torch.float64, device=device)
    band = torch.zeros(B, L, 2 * w, dtype=torch.float64, device=device)  # band[:, v, d] = A[v + d, v]
    d = torch.arange(2 * w, device=device)
    rows = max(1, tile_elements // max(1, Hq * L))
    for u0 in range(0, L, rows):
        u1 = min(L, u0 + rows)
        probs = _tile_probs(q[:, :, :, u0:u1].float(), key, u0, scaling, sliding_window, softcap)  # [B, T, u1]
        col_sum[:, :u1] += probs.sum(dim=1, dtype=torch.float64)
        u = torch.arange(u0, u1, device=device).view(-1, 1)          # [T, 1]
        v = u - d                                                      # [T, 2w]
        ok = v >= 0
        vals = probs.gather(2, v.clamp(min=0).expand(B, -1, -1))       # [B, T, 2w] = A[u, u - d]
        band[:, v[ok], d.expand_as(v)[ok]] = vals[:, ok].double()

    # remaining[:, v, n] = mass on key v from queries u >= v + n + 1 = colsum(v) - sum_{d <= n} A[v + d, v]
    remaining = (col_sum.unsqueeze(-1) - band.cumsum(dim=-1)).clamp(min=0)  # [B, L, 2w]
    zero = torch.zeros(B, w, dtype=torch.float64, device=device)
    past = torch.zeros(B, L, dtype=torch.float64, device=device)
    fut = torch.zeros(B, L, dtype=torch.float64, device=device)
    for j in range(w):
        # past key v = i - j, future queries start at u = i + w + 1 = v + (w + j) + 1
        past += torch.cat([zero[:, :j], remaining[:, : L - j, w + j]], dim=1)[:, :L]
        # future key v = i + 1 + j, queries start at u = v + (w - 1 - j) + 1
        fut += torch.cat([remaining[:, 1 + j:, w - 1 - j], zero[:, : 1 + j]], dim=1)[:, :L]

    i = torch.arange(L, device=device)
    n_future = (L - 1 - i - w).clamp(min=1).double()
    a_past, a_fut = past / n_future, fut / n_future
    ratio = (torch.maximum(a_past, a_fut) + eps) / (torch.minimum(a_past, a_fut) + eps)
    defined = (i >= w) & ((L - 1 - i - w) >= min_future)
    return torch.where(defined, ratio, torch.nan).float()


def soft_labels(ratios: torch.Tensor, alpha: float = ALPHA, beta: float = BETA, zeta: float = ZETA) -> torch.Tensor:
    """Eq. 8: p = sigmoid(alpha * (log(r + zeta) - beta)); NaN ratios stay NaN (undefined labels)."""
    return torch.sigmoid(alpha * (torch.log(ratios + zeta) - beta))


__all__ = ["attention_mass_ratios", "soft_labels", "WINDOW", "EPSILON", "ALPHA", "BETA", "ZETA"]
