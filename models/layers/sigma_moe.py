"""σ-MoE feed-forward (MoEUT §1.1): sigmoid router, top-k without renormalisation, experts on the raw residual.

The expert bank is its own module so that `parallel/` can swap it for an expert-parallel one: it maps
(rows, expert ids, gates) to the gated sum of expert outputs and knows nothing about routing.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.moe import expert_mlp
from kernels.moe.dispatch import primitive_backend
from models.init import Fill, init_module, normal, then
from models.layers.norm import upcast


class ExpertMLPs(nn.Module):
    """E two-layer ReLU experts: keys [E, d, es], values [E, es, d], no biases. An expert bank
    (`models.contract.ExpertBank`): experts on dim 0, the hidden width es on dims 2 and 1."""

    def __init__(self, num_experts: int, dim: int, expert_size: int, block: int | None = None, backend: str = "auto"):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(num_experts, dim, expert_size))
        self.values = nn.Parameter(torch.empty(num_experts, expert_size, dim))
        self.block, self.backend = block, backend

    def expert_parameters(self) -> dict[str, int]:
        return {"keys": 2, "values": 1}

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [N, d], expert_ids and gates [N, k] -> [N, d] = Σ_j gates[:, j] · relu(x keys_e) values_e."""
        k = expert_ids.shape[-1]
        return expert_mlp(x, expert_ids, gates.to(x.dtype), self.keys, self.values, fan_in=k, fan_out=k,
                          block=self.block, backend=self.backend)

    def expert_forward(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """rows [N, d], expert_ids [N] -> relu(rows keys_e) values_e per row (our primitives: megablocks
        has no ungated per-row entry point)."""
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        return expert_mlp(rows, expert_ids[:, None], ones, self.keys, self.values, fan_in=1, fan_out=1,
                          block=self.block, backend=primitive_backend(self.backend))


def renorm_keep_std(w: torch.Tensor) -> None:
    """Rows to equal norm, then one global scale back to the original std (MoEUT's router init)."""
    std = w.std()
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(std / w.std())


class SigmaMoE(nn.Module):
    def __init__(self, dim: int, num_experts: int, expert_size: int, top_k: int, block: int | None = None,
                 backend: str = "auto", layer_index: int = 0):
        super().__init__()
        self.top_k, self.layer_index = top_k, layer_index  # the index names its load metrics
        self.router = nn.Parameter(torch.empty(num_experts, dim))  # W_sel
        self.experts = ExpertMLPs(num_experts, dim, expert_size, block, backend)
        self.load: torch.Tensor | None = None  # assignments per expert in training since last read (for metrics)

    def init_rules(self, scale: float) -> dict[str, Fill]:
        """scale = √(2 / total depth); spec §1.5."""
        E, d, es = self.experts.keys.shape
        return {"router": then(normal(scale / math.sqrt(d)), renorm_keep_std),
                "experts.keys": normal(scale / math.sqrt(d)), "experts.values": normal(scale / math.sqrt(E * es))}

    def init_weights(self, scale: float) -> None:
        init_module(self, self.init_rules(scale))

    def forward(self, x: torch.Tensor, sel_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, sel_input [B, T, d] -> (output [B, T, d], per-sequence mean router softmax [B, E] in fp32).

        The second output feeds the entropy regulariser (§1.4): a softmax of the raw logits although
        routing uses the sigmoid."""
        logits = upcast(sel_input) @ upcast(self.router).t()  # routing in fp32 or wider (determinism, §3.3)
        gates, ids = torch.topk(torch.sigmoid(logits), self.top_k, dim=-1, sorted=True)
        if self.training:
            counts = torch.bincount(ids.flatten(), minlength=self.router.shape[0])
            self.load = counts if self.load is None else self.load + counts
        y = self.experts(x.reshape(-1, x.shape[-1]), ids.reshape(-1, self.top_k), gates.reshape(-1, self.top_k))
        return y.view_as(x), torch.softmax(logits, dim=-1).mean(dim=1)
