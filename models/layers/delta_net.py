"""The DeltaNet token mixer (arXiv 2406.06484; Gated DeltaNet, arXiv 2412.06464): projections, short
convs, L2-normalised q/k, sigmoid β, the delta rule, per-head output norm, optional output gate.

Spec: ../shared/specs/deltanet.md §4. Head counts come from the projections' shapes, so a
tensor-parallel plan that shards q/k/v/β by whole heads (and the convs and decay parameters by
the same channels) runs this module unchanged on its local heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.delta_rule import chunk_delta_rule, delta_rule_recurrent
from models.contract import Inputs, SequenceCore
from models.init import Fill, init_module, norm_rules, normal, prefixed, then, uniform
from models.layers.norm import RMSNorm, upcast
from models.layers.short_conv import ShortConv


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σx² + eps) over the last dim, statistics in fp32 (bf16 norms destabilise the solve)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def sequence_ids(cu_seqlens: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Sequence index of each of T packed tokens (None without varlen)."""
    if cu_seqlens is None:
        return None
    return torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(T, device=cu_seqlens.device), right=True)


class DeltaRuleCore(SequenceCore):
    """Short convs (+SiLU) on the q/k/v projections, L2 norm of q/k, then the chunked delta rule.

    A context-parallel core (`models.contract`): a slice maps the state coming in to the state going
    out affinely, S_out = M S_in + E, and [M | E] ([B, H, K, K+V]) is itself a delta-rule final state —
    the slice run with values [0 | v] from the initial state [I | 0] (spec §6).
    """

    def __init__(self, key_dim: int, value_dim: int, head_dim: int, conv_width: int, chunk_size: int, backend: str):
        super().__init__()
        self.head_dim, self.chunk_size, self.backend = head_dim, chunk_size, backend
        self.halo = conv_width - 1
        self.q_conv = ShortConv(key_dim, conv_width)
        self.k_conv = ShortConv(key_dim, conv_width)
        self.v_conv = ShortConv(value_dim, conv_width)

    def init_rules(self) -> dict[str, Fill]:
        return {k: v for name in ("q_conv", "k_conv", "v_conv") for k, v in prefixed(name, self.get_submodule(name).init_rules()).items()}

    def _run(self, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN003
        return chunk_delta_rule(**kw, chunk_size=self.chunk_size, backend=self.backend)

    def scan(self, inputs: Inputs, initial_state: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        q, k, v, beta, g = inputs
        return self._run(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens)[0]

    def summarize(self, inputs: Inputs) -> torch.Tensor:
        _, k, v, beta, g = inputs
        B, T, H, K = k.shape
        sd = torch.promote_types(k.dtype, torch.float32)  # fp32 summaries (float64 for float64 inputs)
        eye = torch.eye(K, dtype=sd, device=k.device).expand(B, H, K, K)
        start = torch.cat([eye, eye.new_zeros(B, H, K, v.shape[-1])], dim=-1)
        values = torch.cat([v.new_zeros(B, T, H, K), v], dim=-1)
        return self._run(q=k, k=k, v=values, beta=beta, g=g, initial_state=start, output_final_state=True)[1]

    def zero_summary(self, inputs: Inputs) -> torch.Tensor:
        _, k, v, _, _ = inputs
        B, _, H, K = k.shape
        # tied to k, so a rank that sends nothing still runs the same backward collectives, in order
        zeros = k.new_zeros(B, H, K, K + v.shape[-1], dtype=torch.promote_types(k.dtype, torch.float32))
        return zeros + 0 * k[:, -1:].sum()

    def fold(self, summary: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        K = summary.shape[-2]
        M, E = summary[..., :K], summary[..., K:]
        return E if state is None else M @ state + E

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                g: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """q, k [B,T,H·K], v [B,T,H·V] (projections, before the conv); beta, g [B,T,H] -> o [B,T,H,V]."""
        ids = sequence_ids(cu_seqlens, q.shape[1])
        left, left_ids = self.left_context((q, k, v))
        lefts = left.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1) if left is not None else (None,) * 3
        q, k, v = (F.silu(conv(x, ids, lx, left_ids)).unflatten(-1, (-1, self.head_dim))
                   for conv, x, lx in zip((self.q_conv, self.k_conv, self.v_conv), (q, k, v), lefts))
        return self.recurrence((l2_normalize(q), l2_normalize(k), v, beta, g), cu_seqlens)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
             cache: dict) -> torch.Tensor:
        """One token per row (inputs [B,1,·]): the conv reads its last W-1 inputs from `cache`, the delta
        rule its state: O(1) memory per token."""
        outs = []
        for name, conv, x in (("q", self.q_conv, q), ("k", self.k_conv, k), ("v", self.v_conv, v)):
            left = cache.get(name)
            outs.append(F.silu(conv(x, left=left)).unflatten(-1, (-1, self.head_dim)))
            cache[name] = torch.cat([left, x], dim=1)[:, 1:] if left is not None else \
                torch.cat([x.new_zeros(x.shape[0], conv.width - 2, x.shape[2]), x], dim=1)
        q, k, v = outs
        o, cache["state"] = delta_rule_recurrent(l2_normalize(q), l2_normalize(k), v, beta, g=g,
                                                 initial_state=cache.get("state"), output_final_state=True)
        return o


class DecayGate(nn.Module):
    """Gated DeltaNet's per-head log-decay g = −exp(A_log)·softplus(a + dt_bias) ≤ 0 (Mamba2's form)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))

    @staticmethod
    def _dt_bias(t: torch.Tensor, g: torch.Generator) -> None:
        dt = torch.exp(t.uniform_(math.log(1e-3), math.log(1e-1), generator=g))
        t.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    def init_rules(self) -> dict[str, Fill]:
        # A ~ U(1, 16), dt ~ log-uniform in [1e-3, 1e-1] (Mamba2 / GDN): a spread of memory lengths across heads.
        return {"A_log": then(uniform(1, 16), torch.Tensor.log_), "dt_bias": self._dt_bias}

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = upcast(a)
        return -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))


class DeltaNetMixer(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, *, conv_width: int = 4, chunk_size: int = 64,
                 output_gate: bool = False, decay_gate: bool = False, allow_neg_eigval: bool = False,
                 norm_eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        inner = n_heads * head_dim
        self.head_dim, self.allow_neg_eigval = head_dim, allow_neg_eigval
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.b_proj = nn.Linear(dim, n_heads, bias=False)
        self.a_proj = nn.Linear(dim, n_heads, bias=False) if decay_gate else None
        self.decay = DecayGate(n_heads) if decay_gate else None
        self.core = DeltaRuleCore(inner, inner, head_dim, conv_width, chunk_size, backend)
        self.o_norm = RMSNorm(head_dim, norm_eps)  # per head, one gain shared by all heads
        self.g_proj = nn.Linear(dim, inner, bias=False) if output_gate else None
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def init_rules(self, init_std: float, out_std: float) -> dict[str, Fill]:
        rules = {f"{n}.weight": normal(init_std) for n in ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj")
                 if getattr(self, n) is not None}
        if self.decay is not None:
            rules |= prefixed("decay", self.decay.init_rules())
        return rules | prefixed("core", self.core.init_rules()) | prefixed("o_norm", norm_rules(self.o_norm)) | \
            {"o_proj.weight": normal(out_std)}

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_module(self, self.init_rules(init_std, out_std))

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        beta = torch.sigmoid(upcast(self.b_proj(x)))
        beta = 2 * beta if self.allow_neg_eigval else beta  # eigenvalues of (I − βkkᵀ) in [−1, 1]
        return beta.to(x.dtype), (self.decay(self.a_proj(x)) if self.decay is not None else None)

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x).unflatten(-1, (-1, self.head_dim)))
        return self.o_proj(o.flatten(2))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        beta, g = self._gates(x)
        o = self.core(self.q_proj(x), self.k_proj(x), self.v_proj(x), beta, g, cu_seqlens=cu_seqlens)
        return self._out(x, o)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        beta, g = self._gates(x)
        o = self.core.step(self.q_proj(x), self.k_proj(x), self.v_proj(x), beta, g, cache)
        return self._out(x, o)
