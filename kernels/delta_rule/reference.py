"""The delta rule token by token: the oracle every chunked path is tested against (float64 capable).

Per (batch, head), tokens as row vectors, state S [K, V] (fla's layout):
    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,    o_t = scale * S_t^T q_t
with g = 0 for plain DeltaNet. Spec: ../shared/specs/deltanet.md §1, §3.
"""
from __future__ import annotations

import torch


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _one_sequence(q, k, v, beta, g, state, scale):  # noqa: ANN001, ANN202 - [T,H,*] tensors, state [H,K,V]
    out = []
    for t in range(q.shape[0]):
        kt, vt, bt = k[t], v[t], beta[t][:, None]  # [H,K], [H,V], [H,1]
        if g is not None:
            state = state * g[t].exp()[:, None, None]
        u = bt * (vt - torch.einsum("hkv,hk->hv", state, kt))  # corrected value
        state = state + kt[:, :, None] * u[:, None, :]
        out.append(scale * torch.einsum("hkv,hk->hv", state, q[t]))
    return torch.stack(out), state


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H]; states [N,H,K,V] -> (o [B,T,H,V], final state or None).

    With `cu_seqlens` (B = 1) each of the N sequences starts from its own initial state.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = _state_dtype(q)
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    o = torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(bounds):
        state = (initial_state[n].to(sd) if initial_state is not None
                 else torch.zeros(H, K, V, dtype=sd, device=q.device))
        part = lambda x: None if x is None else x[b, s:e].to(sd)  # noqa: E731
        out, state = _one_sequence(part(q), part(k), part(v), part(beta), part(g), state, scale)
        if e > s:
            o[b, s:e] = out
        finals.append(state)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
