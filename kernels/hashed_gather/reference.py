"""The oracle: the weighted gather one (row, table) term at a time, in float64, with no sorting or fusing.

Autograd flows through ordinary indexing, products and sums, so the same loop is the oracle of the
backward too: ∂w[n,k] = ⟨∂y[n], T[idx[n,k]]⟩ and ∂T[r] = Σ_{idx[n,k]=r} w[n,k]·∂y[n] (spec §1).
"""
from __future__ import annotations

import torch


def weighted_gather_reference(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[..., :] = Σ_k w[..., k] · tables[idx[..., k]] in float64.

    tables [R, h]; idx [..., K] integer in [0, R) (table offsets k·2^τ already added); w [..., K].
    Returns float64 [..., h]. Gradients reach `tables` and `w` through the float64 casts.
    """
    T, weights = tables.double(), w.double()
    K, h = idx.shape[-1], T.shape[-1]
    flat_idx, flat_w = idx.reshape(-1, K), weights.reshape(-1, K)
    rows = []
    for n in range(flat_idx.shape[0]):
        acc = T.new_zeros(h)
        for k in range(K):
            acc = acc + flat_w[n, k] * T[int(flat_idx[n, k])]
        rows.append(acc)
    y = torch.stack(rows) if rows else T.new_zeros(0, h)
    return y.reshape(*idx.shape[:-1], h)
