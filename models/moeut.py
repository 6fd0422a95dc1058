"""MoEUT (Csordás et al., 2024): a universal transformer of G distinct layers applied R = L / G times, each
layer SwitchHead attention + σ-MoE feed-forward, with the peri-layernorm scheme. Spec: specs/moeut.md §1.

Training-mode forward returns (logits, aux): aux [B, S] holds, per distinct layer, each router's softmax
averaged over positions and applications (sums of per-application terms, so pipeline stages can add
theirs as the activations travel); `entropy_regularizer` turns it into the loss term of §1.4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe.dispatch import MOE_BACKENDS, primitive_backend
from models.config import positive_ints
from models.layers.sigma_moe import SigmaMoE
from models.layers.switch_head import SwitchHeadAttention
from models.init import Fill, init_module, norm_rules, normal, prefixed, torch_linear
from models.registry import ModelSpec, PipeBlock, register

GROUP_ORDERS = ("abab", "aabb")


@dataclass
class MoEUTConfig:
    arch: ClassVar[str] = "moeut"

    d_model: int
    n_layers: int  # total depth L = group_size x repeats
    group_size: int  # G distinct layers
    n_heads: int
    head_dim: int
    att_n_experts: int  # NA per head
    n_experts: int  # NE σ-MoE experts
    top_k: int
    expert_size: int = 128
    att_top_k: int = 2
    vocab_size: int = 8000
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    entropy_reg: float = 0.01  # γ, σ-MoE routers
    att_entropy_reg: float = 0.001  # δ, SwitchHead routers
    group_order: str = "abab"  # "abab": 1..G, 1..G, ...; "aabb": each layer R times in a row
    moe_block: int | None = None  # dispatch tile rows; None: 64 on a GPU, 1 on CPU
    moe_backend: str = "auto"

    def __post_init__(self) -> None:
        positive_ints(self, "d_model", "n_layers", "group_size", "n_heads", "head_dim", "att_n_experts",
                      "n_experts", "top_k", "expert_size", "att_top_k", "vocab_size", "max_seq_len")
        if self.n_layers % self.group_size:
            raise ValueError(f"MoEUTConfig.n_layers={self.n_layers} must be a multiple of group_size={self.group_size}")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEUTConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.group_order not in GROUP_ORDERS:
            raise ValueError(f"MoEUTConfig.group_order={self.group_order!r}; allowed: {', '.join(GROUP_ORDERS)}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"MoEUTConfig.moe_backend={self.moe_backend!r}; allowed: {', '.join(MOE_BACKENDS)}")
        if self.moe_backend == "megablocks":
            from kernels.moe.megablocks_impl import megablocks_missing

            if why := megablocks_missing():
                raise ValueError(f"MoEUTConfig.moe_backend='megablocks' needs the megablocks package (CUDA machines): "
                                 f"{why}; allowed here: {', '.join(b for b in MOE_BACKENDS if b != 'megablocks')}")
        if self.moe_block is not None:
            positive_ints(self, "moe_block")
        for name in ("rope_theta", "norm_eps"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"MoEUTConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("entropy_reg", "att_entropy_reg"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"MoEUTConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")

    @property
    def repeats(self) -> int:
        return self.n_layers // self.group_size

    @property
    def att_top(self) -> int:
        return min(self.att_top_k, self.att_n_experts)

    def schedule(self) -> list[int]:
        """Which distinct layer runs at each depth."""
        G, R = self.group_size, self.repeats
        return [i for _ in range(R) for i in range(G)] if self.group_order == "abab" else \
            [i for i in range(G) for _ in range(R)]

    def stats_width(self) -> int:
        """Width of one distinct layer's router statistics: σ-MoE E, then V and O H·NA (none when NA = 1)."""
        att = 2 * self.n_heads * self.att_n_experts if self.att_n_experts > 1 else 0
        return self.n_experts + att


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: MoEUTConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SwitchHeadAttention(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.att_n_experts, cfg.att_top_k,
                                        cfg.max_seq_len, cfg.rope_theta, cfg.moe_block,
                                        primitive_backend(cfg.moe_backend))  # megablocks has no per-head mapping
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SigmaMoE(cfg.d_model, cfg.n_experts, cfg.expert_size, cfg.top_k, cfg.moe_block, cfg.moe_backend,
                            layer_index=index)

    def init_rules(self, scale: float) -> dict[str, Fill]:
        return (prefixed("attn_norm", norm_rules(self.attn_norm)) | prefixed("attn", self.attn.init_rules(scale))
                | prefixed("ffn_norm", norm_rules(self.ffn_norm)) | prefixed("ffn", self.ffn.init_rules(scale)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Peri-LN: the norms feed only Q, K and the routers; values, experts and the residual see raw x.
        Returns (x, aux): aux [B, S], this layer's statistics in its slot (zeros outside training)."""
        att, att_stats = self.attn(self.attn_norm(x), x)
        x = x + att
        y, ffn_stats = self.ffn(x, self.ffn_norm(x))
        x = x + y
        stats = torch.cat([ffn_stats, *(s.flatten(1) for s in att_stats)], dim=1) / self.cfg.repeats
        if not self.training:
            # Zeros keep the outputs' structure fixed (DeepSpeed's pipeline fixes it at the first step)
            # and make the regulariser exactly 0: evaluation measures cross-entropy alone.
            stats = torch.zeros_like(stats)
        width = stats.shape[1]
        before = self.index * width
        return x, F.pad(stats, (before, (self.cfg.group_size - 1 - self.index) * width))


class MoEUT(nn.Module):
    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MoEUTLayer(cfg, i) for i in range(cfg.group_size))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        """The paper's initialisation (§1.5) by canonical name (models/init.py); the head keeps nn.Linear's default."""
        scale = math.sqrt(2 / self.cfg.n_layers)
        rules = {"tok_embeddings.weight": normal(1 / math.sqrt(self.cfg.d_model))}
        for i, layer in enumerate(self.layers):
            rules |= prefixed(f"layers.{i}", layer.init_rules(scale))
        head = torch_linear(self.cfg.d_model)
        return rules | prefixed("norm", norm_rules(self.norm)) | {"output.weight": head, "output.bias": head}

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every weight (and rope table): from `seed`, or one drawn from torch's RNG."""
        init_module(self, self.init_rules(), seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, vocab]; in training mode (logits, aux) (see the module doc)."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        h, aux = self.tok_embeddings(tokens), 0
        for i in self.cfg.schedule():
            h, a = self.layers[i](h)
            aux = aux + a
        logits = self.output(self.norm(h))
        return (logits, aux) if self.training else logits


def _neg_entropy(p: torch.Tensor) -> torch.Tensor:
    """−H(p) over the last dim, averaged over the rest."""
    return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1).mean()


def entropy_regularizer(cfg: MoEUTConfig, aux: torch.Tensor) -> torch.Tensor:
    """γ·Σ_ffn(−mean_b H(p̄_b)) + δ·Σ_attn(−mean_{b,h} H) for V and O routers (spec §1.4), from the
    model's aux [B, G·stats_width]."""
    E, width = cfg.n_experts, cfg.stats_width()
    total = aux.new_zeros(())
    for seg in aux.split(width, dim=1):
        total = total + cfg.entropy_reg * _neg_entropy(seg[:, :E])
        if width > E:
            for att in seg[:, E:].chunk(2, dim=1):
                total = total + cfg.att_entropy_reg * _neg_entropy(att.unflatten(1, (-1, cfg.att_n_experts)))
    return total


def expert_load_metrics(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Per distinct σ-MoE layer, its experts' share of the assignments since the last call, summed over
    data-parallel ranks: `moe/layer<i>/load_min` and `load_max` (× E: 1 is perfectly balanced) and
    `load_entropy` (normalised by log E: 1 is uniform). Resets the counts."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SigmaMoE) or module.load is None:
            continue
        counts = reduce(module.load.double())
        module.load = None
        share = counts / counts.sum().clamp_min(1)
        E = share.numel()
        prefix = f"moe/layer{module.layer_index}"
        out[f"{prefix}/load_min"] = (share.min() * E).item()
        out[f"{prefix}/load_max"] = (share.max() * E).item()
        out[f"{prefix}/load_entropy"] = (-(share * share.clamp_min(1e-30).log()).sum() / math.log(max(E, 2))).item()
    return out


def pipeline_blocks(model: MoEUT) -> list[PipeBlock]:
    """Embedding, one block per depth (shared layers tied across the stages that run them), norm, head."""
    depth = [PipeBlock(model.layers[i], tie=f"moeut_layer_{i}", layer=True) for i in model.cfg.schedule()]
    return [PipeBlock(model.tok_embeddings), *depth, PipeBlock(model.norm), PipeBlock(model.output)]


def macs_per_token(cfg: MoEUTConfig) -> int:
    """Projection multiply-accumulates per token, routers included, attention matrix and LM head excluded
    (the spec's §1.6 convention)."""
    d, H, dh, NA = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.att_n_experts
    ffn = cfg.n_experts * d + 2 * cfg.top_k * cfg.expert_size * d
    routers = (2 if NA > 1 else 1) * H * NA * d
    att = 2 * d * H * dh + 2 * H * cfg.att_top * d * dh + routers
    return cfg.n_layers * (ffn + att)


def num_params(cfg: MoEUTConfig) -> int:
    d, H, dh, NA, E = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.att_n_experts, cfg.n_experts
    ffn = 2 * E * d * cfg.expert_size + E * d
    att = 2 * d * H * dh + 2 * H * NA * d * dh + (2 if NA > 1 else 1) * H * NA * d
    layer = ffn + att + 4 * d  # + two LayerNorms
    return cfg.group_size * layer + 2 * d + cfg.vocab_size * d + (d + 1) * cfg.vocab_size


def flops_per_token(cfg: MoEUTConfig, seq_len: int) -> float:
    """6 x active MACs per token (forward 2, backward 4 FLOPs each), LM head included, plus QKᵀ and AV."""
    active = macs_per_token(cfg) + cfg.d_model * cfg.vocab_size
    return 6.0 * active + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


_ES = dict(expert_size=128, att_top_k=2, vocab_size=8000)
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=4, group_size=2, n_heads=2, head_dim=16, att_n_experts=4, n_experts=8,
                 top_k=2, expert_size=16),
    "44m": dict(d_model=412, n_layers=16, group_size=2, n_heads=4, head_dim=82, att_n_experts=8, n_experts=155,
                top_k=12, **_ES),
    "126m": dict(d_model=768, n_layers=18, group_size=2, n_heads=4, head_dim=96, att_n_experts=10, n_experts=254,
                 top_k=12, **_ES),
    "244m": dict(d_model=1024, n_layers=18, group_size=2, n_heads=4, head_dim=128, att_n_experts=10,
                 n_experts=387, top_k=16, **_ES),
    "318m": dict(d_model=1024, n_layers=24, group_size=3, n_heads=4, head_dim=128, att_n_experts=10,
                 n_experts=338, top_k=16, **_ES),
    # profiles.py says d_model 1024 (581.9M parameters); the paper's run used 1280 (727.4M): spec §1.6.
    "727m": dict(d_model=1280, n_layers=36, group_size=4, n_heads=5, head_dim=128, att_n_experts=13,
                 n_experts=467, top_k=20, **_ES),
    "1b": dict(d_model=1536, n_layers=36, group_size=4, n_heads=6, head_dim=128, att_n_experts=12, n_experts=565,
               top_k=24, **_ES),
}

# Attention splits by whole heads (Q/K columns, every head's experts and router rows); the σ-MoE's experts
# split their hidden width (es) while its router stays replicated; the head splits the vocabulary.
TP_PLAN = {
    "tok_embeddings": "vocab",
    "layers.*.attn": "headwise_region", "layers.*.attn.wq": "headwise", "layers.*.attn.wk": "headwise",
    "layers.*.ffn.experts": "expert_hidden",
    "output": "colwise",
}

register(
    ModelSpec(
        name="moeut", config_cls=MoEUTConfig, presets=PRESETS, model_cls=MoEUT, tp_plan=TP_PLAN,
        pipeline_blocks=pipeline_blocks,
        expert_bank="layers.*.ffn.experts", num_params=num_params, flops_per_token=flops_per_token,
        aux_loss=entropy_regularizer, step_metrics=expert_load_metrics,
    )
)
