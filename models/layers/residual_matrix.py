"""The Residual Matrix Transformer's residual state (specs/rmt.md §1): each token's residual is a matrix
X ∈ R^{Dk×Dv}, held as `[B, N, Dk, Dv]`. Layers exchange vectors of width Dv with it through static
learned keys: a read with R retrieval keys gives x_h = r_hᵀ X, a write with R storage keys adds
Σ_h w_h x_hᵀ. Both are one `nn.Linear` over the Dk (or R) axis with Dv as a batch axis, so tensor
parallelism splits them with the ordinary column/row styles (a read's R outputs, a write's R inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.norm import upcast

NORMS = ("rmsnorm", "layernorm")


def read(keys: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """X [B, N, Dk, Dv] -> R vectors [B, N, R, Dv]; `keys` is a Linear(Dk, R) (weight [R, Dk]: row h is r_h)."""
    return keys(X.transpose(-1, -2)).transpose(-1, -2)


def write(keys: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """R vectors [B, N, R, Dv] -> their sum of outer products [B, N, Dk, Dv]; `keys` is a Linear(R, Dk)
    (weight [Dk, R]: column h is w_h). Under TP the R inputs are split and the partial sums all-reduced."""
    return keys(vectors.transpose(-1, -2)).transpose(-1, -2)


class MatrixNorm(nn.Module):
    """RMSNorm (the official code) or LayerNorm without bias (the paper) over the whole Dk×Dv matrix,
    with an elementwise gain. The gain is stored flat, [Dk·Dv] (row-major, = vec(γ)): a 1-D tensor is a
    norm gain to the optimizer (no weight decay) as for every other architecture."""

    def __init__(self, d_key: int, d_value: int, kind: str = "rmsnorm", eps: float = 1e-6):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")
        self.shape, self.kind, self.eps = (d_key, d_value), kind, eps
        self.weight = nn.Parameter(torch.empty(d_key * d_value))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        xf = upcast(X)  # statistics over Dk·Dv entries never run in 16 bits
        gain = self.weight.to(xf.dtype).view(self.shape)
        if self.kind == "rmsnorm":
            y = F.rms_norm(xf, self.shape, gain, self.eps)
        else:
            y = F.layer_norm(xf, self.shape, gain, None, self.eps)
        return y.to(X.dtype)
