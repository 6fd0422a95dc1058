"""DeltaNet language model and its two hybrids (arXiv 2406.06484 §4): DeltaNet blocks, optionally
interleaved with sliding-window attention (`hybrid="swa"`) or with a few global attention layers
(`hybrid="global"`). Pre-norm blocks: x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)).

Recurrent generation (`step`) carries, per DeltaNet layer, the K×V state and the last 3 conv
inputs: O(1) memory per token. Spec: ../shared/specs/deltanet.md §4–§5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kernels.backend import BACKENDS
from models.config import positive_ints, round_up
from models.layers.attention import Attention
from models.layers.delta_net import DeltaNetMixer
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.init import Fill, init_module, norm_rules, prefixed
from models.registry import ModelSpec, lm_init_rules, lm_pipeline_blocks, register

HYBRIDS = ("none", "swa", "global")


@dataclass
class DeltaNetConfig:
    """`head_dim`, `ffn_hidden` and `attn_layers` are resolved from None in `__post_init__`."""

    arch: ClassVar[str] = "deltanet"

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int = 8192
    max_seq_len: int = 2048
    head_dim: int | None = None  # K = V; None: d_model / n_heads
    conv_width: int = 4
    chunk_size: int = 64
    output_gate: bool = False  # RMSNorm(o) ⊙ SiLU(W_g x) (fla `use_gate`; off in the paper)
    decay_gate: bool = False  # Gated DeltaNet: α_t = exp(g_t) per head and token
    allow_neg_eigval: bool = False  # β ∈ (0, 2)
    kernel_backend: str = "auto"  # auto | torch | triton
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    hybrid: str = "none"  # none | swa | global
    attn_layers: list[int] | None = None  # 1-indexed attention layers; None: from `hybrid`
    window: int = 512  # sliding window of the "swa" hybrid's attention layers
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        positive_ints(self, "d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len", "conv_width",
                       "ffn_multiple_of", "window")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"{name}.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = round_up(int(8 * self.d_model / 3), self.ffn_multiple_of)
        positive_ints(self, "head_dim", "ffn_hidden")
        if self.chunk_size not in (16, 32, 64):
            raise ValueError(f"{name}.chunk_size={self.chunk_size}; allowed: 16, 32, 64")
        if self.conv_width < 2:
            raise ValueError(f"{name}.conv_width={self.conv_width} must be at least 2")
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"{name}.kernel_backend={self.kernel_backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.hybrid not in HYBRIDS:
            raise ValueError(f"{name}.hybrid={self.hybrid!r}; allowed: {', '.join(HYBRIDS)}")
        if self.attn_layers is None:
            n = self.n_layers
            # SWA: every other layer, starting with DeltaNet; global: layers 2 and N/2 − 1 (paper's text).
            self.attn_layers = {"none": [], "swa": list(range(2, n + 1, 2)),
                                "global": sorted({min(2, n), max(1, n // 2 - 1)})}[self.hybrid]
        self.attn_layers = sorted(set(self.attn_layers))
        bad = [i for i in self.attn_layers if not isinstance(i, int) or not 1 <= i <= self.n_layers]
        if bad:
            raise ValueError(f"{name}.attn_layers has {bad}: layers are numbered 1..n_layers={self.n_layers}")
        if self.attn_layers and (self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2):
            raise ValueError(f"{name}: attention layers need d_model={self.d_model} divisible by n_heads={self.n_heads} "
                             "into an even head dim (rotary)")
        for f in ("norm_eps", "init_std", "rope_theta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}.{f} must be a positive number, got {v!r}")

    @property
    def n_deltanet_layers(self) -> int:
        return self.n_layers - len(self.attn_layers)


class DeltaNetBlock(nn.Module):
    def __init__(self, cfg: DeltaNetConfig, attention: bool):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        if attention:
            self.mixer = Attention(d, H, H, cfg.max_seq_len, cfg.rope_theta,
                                   window=cfg.window if cfg.hybrid == "swa" else None)
        else:
            self.mixer = DeltaNetMixer(d, H, cfg.head_dim, conv_width=cfg.conv_width, chunk_size=cfg.chunk_size,
                                       output_gate=cfg.output_gate, decay_gate=cfg.decay_gate,
                                       allow_neg_eigval=cfg.allow_neg_eigval, norm_eps=cfg.norm_eps,
                                       backend=cfg.kernel_backend)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_hidden)

    def init_rules(self, init_std: float, out_std: float) -> dict[str, Fill]:
        return (prefixed("attn_norm", norm_rules(self.attn_norm)) | prefixed("mixer", self.mixer.init_rules(init_std, out_std))
                | prefixed("mlp_norm", norm_rules(self.mlp_norm)) | prefixed("mlp", self.mlp.init_rules(init_std, out_std)))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        if isinstance(self.mixer, DeltaNetMixer):
            x = x + self.mixer(h, cu_seqlens)
        elif cu_seqlens is not None:
            raise ValueError("varlen (cu_seqlens) is supported by DeltaNet layers only, not by the hybrids' attention")
        else:
            x = x + self.mixer(h)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = x + self.mixer.step(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class DeltaNet(nn.Module):
    def __init__(self, cfg: DeltaNetConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DeltaNetBlock(cfg, i + 1 in cfg.attn_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        """Each parameter's initial value by canonical name (models/init.py)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs scaled down (GPT-2)
        return lm_init_rules(self, lambda layer: layer.init_rules(std, out_std), std)

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every weight (and rope table): from `seed`, or one drawn from torch's RNG."""
        if self.cfg.tie_embeddings:  # to_empty() replaces each module's parameters separately: tie again
            self.output.weight = self.tok_embeddings.weight
        init_module(self, self.init_rules(), seed)

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. `cu_seqlens` ([N+1], B = 1): packed sequences, each
        starting from an empty state (DeltaNet layers only)."""
        if tokens.shape[1] > self.cfg.max_seq_len and self.cfg.attn_layers:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cu_seqlens)
        return self.output(self.norm(h))

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.layers]

    def step(self, tokens: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """One token per row: tokens [B] -> logits [B, vocab]; `cache` (from `new_cache`) is updated in place."""
        h = self.tok_embeddings(tokens[:, None])
        for layer, c in zip(self.layers, cache):
            h = layer.step(h, c)
        return self.output(self.norm(h))[:, 0]

    @torch.no_grad()
    def forward_recurrent(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits of `forward`, token by token through `step` (what generation computes)."""
        cache = self.new_cache()
        return torch.stack([self.step(tokens[:, t], cache) for t in range(tokens.shape[1])], dim=1)


def num_params(cfg: DeltaNetConfig) -> int:
    with torch.device("meta"):
        model = DeltaNet(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter: counted once


def flops_per_token(cfg: DeltaNetConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (matmul weights, fwd + bwd) plus the mixers' own work, ×3 for training.

    Chunked delta rule per head and token (spec §2, chunk C, K = V = head_dim): kkt 2CK, w/u 2C(K+V),
    scan 4KV, output 2CK + 2KV + 2CV. Attention layers: 4·T·d per token forward (QKᵀ and AV over the
    full, or windowed, score matrix: the MFU convention).
    """
    d, C, K = cfg.d_model, cfg.chunk_size, cfg.head_dim
    n_matmul = num_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    delta = cfg.n_heads * (2 * C * K + 2 * C * 2 * K + 4 * K * K + 2 * C * K + 2 * K * K + 2 * C * K)
    span = min(seq_len, cfg.window) if cfg.hybrid == "swa" else seq_len
    attn = 4 * span * cfg.n_heads * K
    return 6.0 * n_matmul + 3.0 * (cfg.n_deltanet_layers * delta + len(cfg.attn_layers) * attn)


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4),
    "125m": dict(d_model=768, n_layers=12, n_heads=12),
    "340m": dict(d_model=1024, n_layers=24, n_heads=8),
    "760m": dict(d_model=1536, n_layers=24, n_heads=12),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16, vocab_size=32000),  # head dim 128 (fla's defaults)
}

# Heads split over TP: q/k/v/β/decay projections by output (whole heads), the convs and the decay
# parameters by the same channels, o_proj by input; the output norm is shared by the heads of
# every rank ("partial": its gradient is summed over TP). Attention layers of the hybrids as in
# Transformer++.
TP_PLAN = {
    "tok_embeddings": "vocab",
    "layers.*.mixer.q_proj": "colwise", "layers.*.mixer.k_proj": "colwise", "layers.*.mixer.v_proj": "colwise",
    "layers.*.mixer.b_proj": "colwise", "layers.*.mixer.a_proj": "colwise", "layers.*.mixer.g_proj": "colwise",
    "layers.*.mixer.core.q_conv": "headwise", "layers.*.mixer.core.k_conv": "headwise",
    "layers.*.mixer.core.v_conv": "headwise", "layers.*.mixer.decay": "headwise",
    "layers.*.mixer.o_norm": "partial",
    "layers.*.mixer.o_proj": "rowwise",
    "layers.*.mixer.wq": "colwise", "layers.*.mixer.wk": "colwise", "layers.*.mixer.wv": "colwise",
    "layers.*.mixer.wo": "rowwise",
    "layers.*.mlp.w_gate": "colwise", "layers.*.mlp.w_up": "colwise", "layers.*.mlp.w_down": "rowwise",
    "output": "colwise",
}


def layout_refusal(cfg: DeltaNetConfig, degrees: dict[str, int]) -> tuple[str, str] | None:
    """The hybrids' attention layers are sequence mixers without a context-parallel form."""
    if degrees.get("cp", 1) > 1 and cfg.attn_layers:
        return "parallel.cp", (f"the {cfg.hybrid} hybrid's attention layers {cfg.attn_layers} would need ring attention "
                               "across ranks, which is not implemented; allowed: 1")
    return None


register(
    ModelSpec(
        name="deltanet", config_cls=DeltaNetConfig, presets=PRESETS, model_cls=DeltaNet, tp_plan=TP_PLAN,
        pipeline_blocks=lm_pipeline_blocks, cp_core="layers.*.mixer.core", num_params=num_params,
        flops_per_token=flops_per_token, layout_refusal=layout_refusal,
    )
)
