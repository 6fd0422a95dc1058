"""`chunk_delta_rule`: the one public entry point; picks the Triton or the pure-torch path."""
from __future__ import annotations

import torch

from kernels.backend import pick_backend
from kernels.delta_rule.torch_impl import chunk_delta_rule_torch


def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                     g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     chunk_size: int = 64, scale: float | None = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Delta rule (gated when `g` is given) in chunks of `chunk_size` tokens.

    q, k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H] (g = log-decay ≤ 0); initial/final states [N,H,K,V] in fp32
    (N = B, or the number of sequences with `cu_seqlens`, where B = 1). Returns (o [B,T,H,V] in q's dtype,
    final state or None). `backend`: "auto" (Triton on a GPU, torch otherwise), "torch" or "triton".
    """
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size={chunk_size}; allowed: 16, 32, 64")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"varlen (cu_seqlens) needs batch size 1, got {q.shape[0]}")
    kwargs = dict(g=g, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, chunk_size=chunk_size, scale=scale)
    if pick_backend(q, backend, "delta rule") == "triton":
        from kernels.delta_rule.triton_impl import chunk_delta_rule_triton  # imports triton: only when asked

        return chunk_delta_rule_triton(q, k, v, beta, **kwargs)
    return chunk_delta_rule_torch(q, k, v, beta, **kwargs)
