"""Transformer++ (Llama-style): pre-norm RMSNorm, rotary GQA attention, SwiGLU MLP."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.config import positive_ints, round_up
from models.layers.attention import Attention
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.init import Fill, init_module, norm_rules, prefixed
from models.registry import ModelSpec, lm_init_rules, lm_pipeline_blocks, register


@dataclass
class TransformerConfig:
    """`n_kv_heads` and `ffn_hidden` are resolved from None in `__post_init__`; derive variants
    with `make_config(...)` rather than `dataclasses.replace`, which would keep resolved values."""

    arch: ClassVar[str] = "transformer"

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int = 8192
    max_seq_len: int = 2048
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attn_bias: bool = False  # biases on q/k/v (Qwen2); o and the MLP never have one
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        positive_ints(self, "d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len",
                       "ffn_multiple_of")
        if self.ffn_hidden is None:
            # SwiGLU has three matrices: 8/3*d keeps its parameter count at that of a 4*d GELU MLP.
            self.ffn_hidden = round_up(int(8 * self.d_model / 3), self.ffn_multiple_of)
        positive_ints(self, "ffn_hidden")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive number, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"TransformerConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim=d_model/n_heads={self.head_dim} must be even for rotary")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len, cfg.rope_theta,
                              qkv_bias=cfg.attn_bias)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def init_rules(self, init_std: float, out_std: float) -> dict[str, Fill]:
        return (prefixed("attn_norm", norm_rules(self.attn_norm)) | prefixed("attn", self.attn.init_rules(init_std, out_std))
                | prefixed("mlp_norm", norm_rules(self.mlp_norm)) | prefixed("mlp", self.mlp.init_rules(init_std, out_std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        x = x + self.attn.step(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        """Each parameter's initial value by canonical name (models/init.py)."""
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down so the residual stream's variance stays O(1) in depth (GPT-2).
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        return lm_init_rules(self, lambda layer: layer.init_rules(std, out_std), std)

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise all weights and rope tables: from `seed`, or one drawn from torch's RNG."""
        if self.cfg.tie_embeddings:  # to_empty() replaces each module's parameters separately: tie again
            self.output.weight = self.tok_embeddings.weight
        init_module(self, self.init_rules(), seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [B, T] -> logits [B, T, vocab_size] in the compute dtype."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.layers]

    def step(self, tokens: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """One token per row: tokens [B] -> logits [B, vocab]; `cache` (from `new_cache`) keeps keys and values."""
        if cache and cache[0].get("pos", 0) >= self.cfg.max_seq_len:
            raise ValueError(f"generation past max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens[:, None])
        for layer, c in zip(self.layers, cache):
            h = layer.step(h, c)
        return self.output(self.norm(h))[:, 0]


def num_params(cfg: TransformerConfig) -> int:
    """Exact parameter count (tied embedding/output weights counted once)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo + wk, wv
    if cfg.attn_bias:
        attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    mlp = 3 * d * cfg.ffn_hidden
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_layer + d + embeddings


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*n_layers*d_model*seq_len (Kaplan et al. / PaLM appendix B).

    6*N is forward (2N) plus backward (4N) of every matmul weight. N is every parameter except
    the embedding lookup table, which does no matmul; the output projection counts even when
    tied, since it is still a d x vocab matmul. The second term is QK^T and AV over the full
    (not causally halved) score matrix, the usual convention for MFU.
    """
    n_matmul = num_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4),
    "125m": dict(d_model=768, n_layers=12, n_heads=12),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),  # head_dim 128
}

# Megatron's layout: q/k/v and gate/up split by output (whole heads), o and down by input; the
# vocabulary split for the embedding and the head (its logits stay sharded into the loss).
TP_PLAN = {
    "tok_embeddings": "vocab",
    "layers.*.attn.wq": "colwise", "layers.*.attn.wk": "colwise", "layers.*.attn.wv": "colwise",
    "layers.*.attn.wo": "rowwise",
    "layers.*.mlp.w_gate": "colwise", "layers.*.mlp.w_up": "colwise", "layers.*.mlp.w_down": "rowwise",
    "output": "colwise",
}



register(
    ModelSpec(
        name="transformer", config_cls=TransformerConfig, presets=PRESETS, model_cls=Transformer,
        tp_plan=TP_PLAN, pipeline_blocks=lm_pipeline_blocks, num_params=num_params, flops_per_token=flops_per_token,
    )
)
