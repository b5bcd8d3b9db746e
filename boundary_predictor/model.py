"""The boundary predictor network (paper §3.2, App. B.2): Pr(position i is the last token of a chunk).

Input: one layer's post-RoPE keys with the KV heads concatenated, features [B, L, Hkv * D].
  1. Normalise: each head's key vector is divided by its RMS (key scales differ between layers, heads and
     models; RoPE keeps the norm), then a linear map to d_model.
  2. Encoder f_MHA, shared by both windows: the w keys of a window (plus a learned position embedding per
     slot) go through one multi-head self-attention layer and are pooled into one vector by multi-head
     attention with a learned query (8 heads). Padding (windows that stick out of the sequence) is masked; a
     learned "null" key in both attentions keeps fully padded windows well defined.
  3. Fusion (eq. 2): h_i = [left, right, |left - right|, left * right, cos(left, right)].
  4. Two-layer MLP (hidden 256) -> logit (eq. 3).
Window [i-w+1, i] is the left window of i and the right window of i-w, so each window is encoded once:
cost is linear in L. `scores` runs the positions in tiles of `tile` so long inputs (32K+) fit in little memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PredictorConfig:
    num_kv_heads: int          # Hkv of the LLM layer the keys come from
    head_dim: int              # D
    window: int = 4            # w (App. B.3)
    d_model: int = 128         # width of the window encoder
    num_heads: int = 8         # heads of both attentions of the encoder
    hidden: int = 256          # MLP hidden size

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if min(self.num_kv_heads, self.head_dim, self.window, self.hidden) < 1:
            raise ValueError(f"invalid predictor config {self}")

    @property
    def feature_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


class MaskedAttention(nn.Module):
    """Multi-head attention over a short set of tokens with a key-padding mask and a learned null key/value."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.null_kv = nn.Parameter(torch.zeros(2, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """queries: [N, Tq, dim], tokens: [N, Tk, dim], valid: [N, Tk] bool -> [N, Tq, dim]."""
        N, Tq, dim = queries.shape
        h, hd = self.heads, dim // self.heads
        k, v = self.kv(tokens).chunk(2, dim=-1)
        k = torch.cat([self.null_kv[0].expand(N, 1, dim), k], dim=1)
        v = torch.cat([self.null_kv[1].expand(N, 1, dim), v], dim=1)
        mask = torch.cat([valid.new_ones(N, 1), valid], dim=1)[:, None, None, :]  # [N, 1, 1, 1 + Tk]
        q = self.q(queries).view(N, Tq, h, hd).transpose(1, 2)
        k = k.view(N, -1, h, hd).transpose(1, 2)
        v = v.view(N, -1, h, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(N, Tq, dim))


class WindowEncoder(nn.Module):
    """f_MHA: w keys -> one vector (self-attention, then attention pooling with a learned query)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(window, dim))
        self.self_attn = MaskedAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.pool_query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.pool = MaskedAttention(dim, heads)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """windows: [N, w, dim], valid: [N, w] bool -> [N, dim]."""
        x = windows + self.position
        x = self.norm(x + self.self_attn(x, x, valid))
        pooled = self.pool(self.pool_query.expand(x.shape[0], 1, -1), x, valid)
        return self.out_norm(pooled.squeeze(1))


class BoundaryPredictor(nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.feature_dim, config.d_model)
        self.encoder = WindowEncoder(config.d_model, config.num_heads, config.window)
        self.mlp = nn.Sequential(
            nn.Linear(4 * config.d_model + 1, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))

    # -- inputs ---------------------------------------------------------------------------------------------
    def features_from_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: [B, Hkv, L, D] (one layer, post-RoPE) -> features [B, L, Hkv * D]."""
        c = self.config
        if keys.dim() != 4 or keys.shape[1] != c.num_kv_heads or keys.shape[3] != c.head_dim:
            raise ValueError(f"keys must be [B, {c.num_kv_heads}, L, {c.head_dim}] (the predictor was trained "
                             f"for that model), got {tuple(keys.shape)}")
        B, H, L, D = keys.shape
        return keys.transpose(1, 2).reshape(B, L, H * D)

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = features.float().unflatten(-1, (c.num_kv_heads, c.head_dim))
        x = F.rms_norm(x, (c.head_dim,), eps=1e-6)
        return self.proj(x.flatten(-2))

    # -- network --------------------------------------------------------------------------------------------
    def _logits_range(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits of positions [start, end) of features [B, L, C]: reads keys [start-w+1, end+w) only."""
        B, L, _ = features.shape
        w = self.config.window
        lo, hi = start - (w - 1), end + w
        x = self._normalise(features[:, max(lo, 0):min(hi, L)])
        pad_left, pad_right = max(0, -lo), max(0, hi - L)
        x = F.pad(x, (0, 0, pad_left, pad_right))
        valid = torch.zeros(hi - lo, dtype=torch.bool, device=x.device)
        valid[pad_left: hi - lo - pad_right] = True
        # windows ending at positions start .. end+w-1: window n covers keys [n-w+1, n]
        windows = x.unfold(1, w, 1).transpose(-1, -2)          # [B, n_win, w, d]
        window_valid = valid.unfold(0, w, 1)                      # [n_win, w]
        n_win = windows.shape[1]
        enc = self.encoder(windows.reshape(B * n_win, w, -1), window_valid.repeat(B, 1)).view(B, n_win, -1)
        left, right = enc[:, : end - start], enc[:, w:]
        cos = F.cosine_similarity(left, right, dim=-1, eps=1e-6).unsqueeze(-1)
        fused = torch.cat([left, right, (left - right).abs(), left * right, cos], dim=-1)
        return self.mlp(fused).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, L, Hkv * D] -> boundary logits [B, L] (logit that i is the last token of a chunk)."""
        if features.dim() != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features must be [B, L, {self.config.feature_dim}], got {tuple(features.shape)}")
        return self._logits_range(features, 0, features.shape[1])

    @torch.no_grad()
    def scores(self, keys: torch.Tensor, tile: int = 4096) -> torch.Tensor:
        """keys: [B, Hkv, L, D] -> probabilities [B, L] (fp32), computed `tile` positions at a time."""
        features = self.features_from_keys(keys)
        L = features.shape[1]
        parts = [self._logits_range(features, s, min(L, s + tile)) for s in range(0, L, tile)]
        return torch.sigmoid(torch.cat(parts, dim=1)) if parts else features.new_zeros(features.shape[0], 0)


__all__ = ["BoundaryPredictor", "PredictorConfig"]
