"""SwitchHead attention (MoEUT §1.2): dense Q and K, value and output projections mixed from NA experts per
head (top-2, sigmoid gates without renormalisation). With NA = 1, V and O are dense and the router only
gates each head's output.

Head counts come from parameter shapes (`router_o.shape[0] // NA`), so a tensor-parallel plan that shards
heads (Q/K columns, expert and router rows by whole heads) runs the module unchanged on its local heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe import expert_mlp
from models.init import Fill, init_module, normal, then
from models.layers.norm import upcast
from models.layers.rope import RotaryEmbedding


def renorm_rows(w: torch.Tensor) -> None:
    """row_i <- (row_i / ‖row_i‖) · std(row_i) / s, s the std of the row-normalised matrix (SwitchHead routers)."""
    row_std = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(row_std / w.std())


class SwitchHeadAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, n_experts: int, top_k: int, max_seq_len: int,
                 rope_theta: float, block: int | None = None, backend: str = "auto"):
        super().__init__()
        self.head_dim, self.n_experts, self.top_k = head_dim, n_experts, min(top_k, n_experts)
        self.block, self.backend = block, backend
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.w_v = nn.Parameter(torch.empty(n_heads * n_experts, dim, head_dim))
        self.w_o = nn.Parameter(torch.empty(n_heads * n_experts, head_dim, dim))
        self.router_v = nn.Parameter(torch.empty(n_heads * n_experts, dim)) if n_experts > 1 else None
        self.router_o = nn.Parameter(torch.empty(n_heads * n_experts, dim))
        # RoPE on the first half of each head, rounded down to an even width (dh 82 -> 40 channels).
        self.n_rotate = head_dim // 2 - (head_dim // 2) % 2
        self.rope = RotaryEmbedding(self.n_rotate, max_seq_len, rope_theta) if self.n_rotate else None

    def init_rules(self, scale: float) -> dict[str, Fill]:
        """scale = √(2 / total depth); spec §1.5. Shapes are the full ones: rules are made before any sharding."""
        d = self.wq.in_features
        n_heads = self.w_o.shape[0] // self.n_experts
        rules = {"wq.weight": normal(scale / math.sqrt(d)), "wk.weight": normal(scale / math.sqrt(d)),
                 "w_v": normal(scale / math.sqrt(d)), "w_o": normal(scale / math.sqrt(n_heads * self.head_dim))}
        for name in ("router_v", "router_o"):
            if getattr(self, name) is not None:
                # spec §1.5: the per-row renorm for sel_v and sel_o whatever NA (with NA = 1, sel_o still
                # gates each head), not σ-MoE's equal-norm renorm_keep_std.
                rules[name] = then(normal(scale / math.sqrt(d)), renorm_rows)
        return rules

    def init_weights(self, scale: float) -> None:
        init_module(self, self.init_rules(scale))

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        if self.rope is None:
            return t
        return torch.cat([self.rope(t[..., :self.n_rotate]), t[..., self.n_rotate:]], dim=-1)

    def _route(self, a: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a [B, T, d] -> gates, global expert ids [B·T, H, top_k] and the per-sequence mean softmax [B, H, NA]."""
        B, T, _ = a.shape
        logits = (upcast(a) @ upcast(router).t()).view(B, T, -1, self.n_experts)
        gates, ids = torch.topk(torch.sigmoid(logits), self.top_k, dim=-1, sorted=True)
        heads = torch.arange(logits.shape[2], device=a.device).view(1, 1, -1, 1) * self.n_experts
        return (gates.flatten(0, 1), (ids + heads).flatten(0, 1), torch.softmax(logits, dim=-1).mean(dim=1))

    def forward(self, a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """a = LN1(x) feeds Q, K and the routers; the values read the raw residual x. Returns the output
        [B, T, d] and the router statistics for the regulariser ([B, H, NA] for V and O; none when NA = 1)."""
        B, T, d = x.shape
        q = self._rotate(self.wq(a).unflatten(-1, (-1, self.head_dim)))
        k = self._rotate(self.wk(a).unflatten(-1, (-1, self.head_dim)))
        H = q.shape[2]
        scale = self.head_dim ** -0.25  # on Q and K both; the softmax then uses scale 1
        rows = x.reshape(B * T, d)
        if self.n_experts == 1:
            v = torch.einsum("nd,hde->nhe", rows, self.w_v)
            o_gate = torch.sigmoid(upcast(a) @ upcast(self.router_o).t()).to(x.dtype)  # [B, T, H]
            stats = []
        else:
            gv, iv, pv = self._route(a, self.router_v)
            go, io, po = self._route(a, self.router_o)
            v = expert_mlp(rows, iv, gv.to(x.dtype), self.w_v, fan_in=H * self.top_k, fan_out=self.top_k,
                           block=self.block, backend=self.backend)  # rows (t, h)
            stats = [pv, po]
        v = v.view(B, T, H, self.head_dim)
        att = F.scaled_dot_product_attention((q * scale).transpose(1, 2), (k * scale).transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, scale=1.0).transpose(1, 2)
        if self.n_experts == 1:
            out = torch.einsum("bthe,hed->btd", att * o_gate.unsqueeze(-1), self.w_o)
        else:
            out = expert_mlp(att.reshape(B * T * H, self.head_dim), io, go.to(x.dtype), self.w_o,
                             fan_in=self.top_k, fan_out=H * self.top_k, block=self.block,
                             backend=self.backend).view(B, T, d)
        return out, stats
