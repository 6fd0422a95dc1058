"""Chunked delta rule in pure torch (WY representation + UT transform): the fast CPU path.

Each chunk of C tokens is solved in closed form (spec §2, §3 with gates); only the state scan over
chunks is sequential. Padding to a whole chunk is exact: padded tokens have k = v = beta = g = 0,
which leaves the state untouched. Autograd differentiates through it (the triangular solve
included), which is fast enough for CPU training; the Triton path brings its own backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.delta_rule.reference import _state_dtype


def _pad(x: torch.Tensor, T: int, C: int) -> torch.Tensor:
    """[B,T,H,*] -> [B,H,NT,C,*], zero-padded on T."""
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if x.dim() > 3 else F.pad(x, (0, 0, 0, pad))
    x = x.transpose(1, 2)  # [B,H,T',*]
    return x.reshape(*x.shape[:2], -1, C, *x.shape[3:])


def _chunked(q, k, v, beta, g, state, scale: float, C: int):  # noqa: ANN001, ANN202 - one batch of sequences
    B, T, H, K = k.shape
    sd = state.dtype
    Q, Kc, Vc = (_pad(x.to(sd), T, C) for x in (q, k, v))  # [B,H,NT,C,*]
    b = _pad(beta.to(sd), T, C)  # [B,H,NT,C]
    gam = _pad(g.to(sd), T, C).cumsum(-1) if g is not None else torch.zeros_like(b)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(γ_i − γ_j) on and below the diagonal only: above it the exponent is positive and may overflow.
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kk = Kc @ Kc.transpose(-1, -2)
    A = (b[..., :, None] * kk * decay).tril(-1)
    eye = torch.eye(C, dtype=sd, device=q.device)
    Ai = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    W = Ai @ (b[..., None] * Kc * gam.exp()[..., None])
    U = Ai @ (b[..., None] * Vc)
    attn = (Q @ Kc.transpose(-1, -2)) * decay  # causal, diagonal kept
    last = gam[..., -1:]  # [B,H,NT,1]
    q_dec = Q * gam.exp()[..., None]
    k_dec = Kc * (last - gam).exp()[..., None]
    # Unbind once: indexing chunk c out of a whole tensor inside the loop would make each chunk's backward
    # build a gradient the size of the whole tensor, O(NT²) over the scan.
    per_chunk = zip(*(t.unbind(2) for t in (U, W, q_dec, attn, k_dec, last.exp()[..., None])))
    outs = []
    for u, w, qd, a, kd, decay_all in per_chunk:
        v_new = u - w @ state
        outs.append(scale * (qd @ state + a @ v_new))
        state = decay_all * state + kd.transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).reshape(B, H, -1, v.shape[-1])[:, :, :T].transpose(1, 2)
    return o, state


def chunk_delta_rule_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                           g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           chunk_size: int = 64, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `reference.delta_rule_recurrent`, chunk by chunk; states in fp32 (fp64 for fp64)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = _state_dtype(q)
    if cu_seqlens is None:
        state = initial_state.to(sd) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=sd)
        o, state = _chunked(q, k, v, beta, g, state, scale, chunk_size)
        return o.to(q.dtype), (state if output_final_state else None)
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        state = initial_state[n:n + 1].to(sd) if initial_state is not None else q.new_zeros(1, H, K, V, dtype=sd)
        part = (lambda x: None if x is None else x[:, s:e])  # noqa: E731
        o, state = _chunked(part(q), part(k), part(v), part(beta), part(g), state, scale, chunk_size)
        outs.append(o)
        finals.append(state)
    return torch.cat(outs, dim=1).to(q.dtype), (torch.cat(finals) if output_final_state else None)
