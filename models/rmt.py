"""Residual Matrix Transformer (Mak & Flanigan, ICML 2025; specs/rmt.md): the residual stream is a matrix
X ∈ R^{Dk×Dv} per token, read and written by static learned keys (models/layers/residual_matrix.py).

Pre-norm blocks: X ← X + MHA(Norm X); X ← X + FF(Norm X). Attention head h reads q_h, k_h, v_h ∈ R^{Dv}
with its own retrieval keys and writes its output with its own storage key (there is no W_O); the FFN reads
R vectors, runs W2·GELU(W1·x) at full width R·Dv → D_FF → R·Dv and writes R vectors back. The embedding
(and, with `pos_encoding: learned`, the position table) gives R vectors per token, written with storage
keys; the unembedding reads R vectors and projects them to the vocabulary. Untied, no biases.

Choices where the spec leaves one (all config): learned positions (the paper) by default, ALiBi (the code)
as an option; RMSNorm over Dk·Dv (the code) or bias-free LayerNorm (the paper); GELU in its tanh form
(JAX's default, as the official code); attention in fp32 with logits ÷ (layer + 1). The z-loss is
added by the training loss (`ModelSpec.z_loss`), where the logits' log-partition is known under TP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.config import positive_ints
from models.init import Fill, init_module, normal, ones, zeros
from models.layers.norm import upcast
from models.layers.residual_matrix import NORMS, MatrixNorm, read, write
from models.registry import ModelDims, ModelSpec, lm_pipeline_blocks, register

POS_ENCODINGS = ("learned", "alibi")


@dataclass
class RMTConfig:
    arch: ClassVar[str] = "rmt"
    tie_embeddings: ClassVar[bool] = False  # the paper and the code: untied (no option)

    d_key: int  # Dk: residual rows, the keys' length
    d_value: int  # Dv: residual columns = head dim = width of one read/written vector
    rank: int  # R: attention heads, and vectors per read/write
    n_layers: int
    d_ff: int
    vocab_size: int = 50257
    max_seq_len: int = 512
    pos_encoding: str = "learned"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    init_std: float = 0.02
    zero_init_query: bool = False  # the code intends it (µP App. D.2) but discards it: an explicit option here
    inverse_layer_attn_scaling: bool = True  # attention logits ÷ (layer index + 1)
    # µP multipliers and base dims (spec §3, §7); base None: this model's own dims (width ratio 1)
    input_mult: float = 1.0
    attn_mult: float = 1.0
    output_mult: float = 1.0
    base_d_value: int | None = None
    base_rank: int | None = None
    z_loss_coef: float = 1e-4  # × mean logsumexp(logits)² in training (the paper's 1e-4); 0: off

    def __post_init__(self) -> None:
        if self.base_d_value is None:
            self.base_d_value = self.d_value
        if self.base_rank is None:
            self.base_rank = self.rank
        positive_ints(self, "d_key", "d_value", "rank", "n_layers", "d_ff", "vocab_size", "max_seq_len",
                      "base_d_value", "base_rank")
        for name, allowed in (("pos_encoding", POS_ENCODINGS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RMTConfig.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("norm_eps", "init_std", "input_mult", "attn_mult", "output_mult"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RMTConfig.{name} must be a positive number, got {value!r}")
        z = self.z_loss_coef
        if not isinstance(z, (int, float)) or isinstance(z, bool) or z < 0:
            raise ValueError(f"RMTConfig.z_loss_coef must be a number >= 0, got {z!r}")

    @property
    def residual_size(self) -> int:
        return self.d_key * self.d_value

    @property
    def width_ratio(self) -> float:
        """µP width of the FFN core R·Dv over its base; the unembedding's output is divided by it."""
        return (self.rank * self.d_value) / (self.base_rank * self.base_d_value)


def alibi_slopes(rank: int) -> torch.Tensor:
    """Head h's slope 2^(−8(h+1)/R): geometric from 2^(−8/R) to 2^(−8), as the official code."""
    return torch.pow(2.0, -8.0 * torch.arange(1, rank + 1, dtype=torch.float64) / rank)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[R, Tq, Tk] additive logits: −slope·(i − j) where key j ≤ query i, −inf after it."""
    back = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)
    bias = -slopes[:, None, None] * back
    return bias.masked_fill(back < 0, float("-inf"))


class MatrixEmbedding(nn.Module):
    """R vectors per token from the table (and per position from the position table), each set
    written into the residual matrix with its own R storage keys."""

    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.d_value, self.input_mult = cfg.d_value, cfg.input_mult
        self.table = nn.Embedding(cfg.vocab_size, cfg.rank * cfg.d_value)
        self.write = nn.Linear(cfg.rank, cfg.d_key, bias=False)
        if cfg.pos_encoding == "learned":
            # An embedding over positions, so TP splits it like the vocabulary table (and under sequence
            # parallelism each rank receives its own positions' rows) with no rank known here.
            self.positions = nn.Embedding(cfg.max_seq_len, cfg.rank * cfg.d_value)
            self.write_positions = nn.Linear(cfg.rank, cfg.d_key, bias=False)
        else:
            self.positions = self.write_positions = None

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B, T] (positions start..start+T−1) -> X [B, T, Dk, Dv]."""
        X = write(self.write, self.table(tokens).unflatten(-1, (-1, self.d_value)))
        if self.positions is not None:
            pos = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
            X = X + write(self.write_positions, self.positions(pos).unflatten(-1, (-1, self.d_value)))
        return X * self.input_mult if self.input_mult != 1 else X


class MatrixAttention(nn.Module):
    """Softmax attention over R heads of width Dv, read from and written to the residual matrix."""

    def __init__(self, cfg: RMTConfig, layer_index: int):
        super().__init__()
        self.read_q = nn.Linear(cfg.d_key, cfg.rank, bias=False)
        self.read_k = nn.Linear(cfg.d_key, cfg.rank, bias=False)
        self.read_v = nn.Linear(cfg.d_key, cfg.rank, bias=False)
        self.write = nn.Linear(cfg.rank, cfg.d_key, bias=False)
        scale = cfg.attn_mult * math.sqrt(cfg.base_d_value) / cfg.d_value  # µP: 1/√Dv at the base width
        self.scale = scale / (layer_index + 1) if cfg.inverse_layer_attn_scaling else scale
        self.alibi = cfg.pos_encoding == "alibi"
        self.register_buffer("slopes", alibi_slopes(cfg.rank) if self.alibi else None, persistent=False)

    def init_buffers(self) -> None:
        if self.alibi:
            self.slopes = alibi_slopes(self.slopes.shape[0]).to(self.slopes.device)

    def _heads(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, R, T, Dv] in fp32 (the paper's attention upcast; float64 stays float64)."""
        return tuple(upcast(read(m, X)).transpose(1, 2) for m in (self.read_q, self.read_k, self.read_v))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, causal: bool) -> torch.Tensor:
        if self.alibi:
            q_pos = torch.arange(q_start, q_start + q.shape[2], device=q.device)
            bias = alibi_bias(self.slopes.to(q.dtype), q_pos, torch.arange(k.shape[2], device=q.device))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale)

    def _out(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return write(self.write, y.transpose(1, 2).to(like.dtype))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(X)
        return self._out(self._attend(q, k, v, 0, causal=True), X)

    def step(self, X: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row, X [B, 1, Dk, Dv]; `cache` keeps this layer's keys and values."""
        pos = cache.get("pos", 0)
        q, k, v = self._heads(X)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache.update(k=k, v=v, pos=pos + 1)
        return self._out(self._attend(q, k, v, pos, causal=False), X)


class MatrixFFN(nn.Module):
    """Read R vectors, W2·GELU(W1·x) over their concatenation, write the R result vectors."""

    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.d_value = cfg.d_value
        self.read = nn.Linear(cfg.d_key, cfg.rank, bias=False)
        self.w1 = nn.Linear(cfg.rank * cfg.d_value, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.rank * cfg.d_value, bias=False)
        self.write = nn.Linear(cfg.rank, cfg.d_key, bias=False)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        f = self.w2(F.gelu(self.w1(read(self.read, X).flatten(-2)), approximate="tanh"))
        return write(self.write, f.unflatten(-1, (-1, self.d_value)))


class MatrixHead(nn.Module):
    """Read R vectors and project their concatenation to the vocabulary."""

    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.read = nn.Linear(cfg.d_key, cfg.rank, bias=False)
        self.proj = nn.Linear(cfg.rank * cfg.d_value, cfg.vocab_size, bias=False)
        self.out_scale = cfg.output_mult / cfg.width_ratio

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        logits = self.proj(read(self.read, X).flatten(-2))
        return logits * self.out_scale if self.out_scale != 1 else logits


class RMTBlock(nn.Module):
    def __init__(self, cfg: RMTConfig, layer_index: int):
        super().__init__()
        self.attn_norm = MatrixNorm(cfg.d_key, cfg.d_value, cfg.norm, cfg.norm_eps)
        self.attn = MatrixAttention(cfg, layer_index)
        self.ffn_norm = MatrixNorm(cfg.d_key, cfg.d_value, cfg.norm, cfg.norm_eps)
        self.ffn = MatrixFFN(cfg)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X + self.attn(self.attn_norm(X))
        return X + self.ffn(self.ffn_norm(X))

    def step(self, X: torch.Tensor, cache: dict) -> torch.Tensor:
        X = X + self.attn.step(self.attn_norm(X), cache)
        return X + self.ffn(self.ffn_norm(X))


class RMT(nn.Module):
    def __init__(self, cfg: RMTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = MatrixEmbedding(cfg)
        self.layers = nn.ModuleList(RMTBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = MatrixNorm(cfg.d_key, cfg.d_value, cfg.norm, cfg.norm_eps)
        self.output = MatrixHead(cfg)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        """Spec §3 (the code's µP table, global std σ): retrieval keys σ/√Dk, storage keys σ/√R (a block's
        output writes also ÷ √(2L)), W1 σ/√(R·Dv), W2 σ/√D_FF, embeddings σ, the unembedding zero."""
        c = self.cfg
        std = c.init_std
        retrieval, storage = normal(std / math.sqrt(c.d_key)), normal(std / math.sqrt(c.rank))
        out_storage = normal(std / math.sqrt(c.rank) / math.sqrt(2 * c.n_layers))
        rules = {"tok_embeddings.table.weight": normal(std), "tok_embeddings.write.weight": storage}
        if c.pos_encoding == "learned":
            rules |= {"tok_embeddings.positions.weight": normal(std), "tok_embeddings.write_positions.weight": storage}
        for i in range(c.n_layers):
            p = f"layers.{i}"
            rules |= {f"{p}.attn_norm.weight": ones, f"{p}.ffn_norm.weight": ones,
                      f"{p}.attn.read_q.weight": zeros if c.zero_init_query else retrieval,
                      f"{p}.attn.read_k.weight": retrieval, f"{p}.attn.read_v.weight": retrieval,
                      f"{p}.attn.write.weight": out_storage,
                      f"{p}.ffn.read.weight": retrieval, f"{p}.ffn.write.weight": out_storage,
                      f"{p}.ffn.w1.weight": normal(std / math.sqrt(c.rank * c.d_value)),
                      f"{p}.ffn.w2.weight": normal(std / math.sqrt(c.d_ff))}
        return rules | {"norm.weight": ones, "output.read.weight": retrieval, "output.proj.weight": zeros}

    def init_weights(self, seed: int | None = None) -> None:
        init_module(self, self.init_rules(), seed)

    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual matrices after the last block, [B, T, Dk, Dv]."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        X = self.tok_embeddings(tokens)
        for layer in self.layers:
            X = layer(X)
        return X

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab_size]."""
        return self.output(self.norm(self.residual(tokens)))

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.layers]

    def step(self, tokens: torch.Tensor, cache: list[dict]) -> torch.Tensor:
        """One token per row: tokens [B] -> logits [B, vocab]; `cache` (from `new_cache`) keeps keys and values."""
        pos = cache[0].get("pos", 0) if cache else 0
        if pos >= self.cfg.max_seq_len:
            raise ValueError(f"generation past max_seq_len={self.cfg.max_seq_len}")
        X = self.tok_embeddings(tokens[:, None], start=pos)
        for layer, c in zip(self.layers, cache):
            X = layer.step(X, c)
        return self.output(self.norm(X))[:, 0]


# --- accounting (spec §5) -------------------------------------------------------------------------

def paper_num_params(cfg: RMTConfig) -> int:
    """The paper's itemised sum (App. A): keys, FFN, embeddings, positions, unembedding; norm gains not
    counted (as the §4 tables: 45.9M / 134.2M / 206.2M / 304.9M)."""
    R, Dk, Dv = cfg.rank, cfg.d_key, cfg.d_value
    per_layer = 3 * R * Dk + R * Dk + 2 * R * Dk + 2 * R * Dv * cfg.d_ff  # QKV reads, out write, FFN read+write
    once = 2 * R * cfg.vocab_size * Dv + R * Dk + R * Dk  # word table + unembedding, word storage keys, head read
    if cfg.pos_encoding == "learned":
        once += R * cfg.max_seq_len * Dv + R * Dk
    return cfg.n_layers * per_layer + once


def num_params(cfg: RMTConfig) -> int:
    """Every parameter: the itemised sum plus the 2L + 1 norm gains of Dk·Dv."""
    return paper_num_params(cfg) + (2 * cfg.n_layers + 1) * cfg.residual_size


def macs_per_token(cfg: RMTConfig, seq_len: int) -> int:
    """Forward multiply-accumulates per token: every read/write (Dk·Dv per vector), the FFN, the attention
    scores and their values over the full (not causally halved) T×T matrix, the unembedding."""
    R, rw = cfg.rank, cfg.rank * cfg.residual_size  # one read or write of R vectors
    per_layer = 6 * rw + 2 * R * cfg.d_value * cfg.d_ff + 2 * R * cfg.d_value * seq_len
    once = rw + rw + R * cfg.d_value * cfg.vocab_size  # word write, head read, projection
    if cfg.pos_encoding == "learned":
        once += rw
    return cfg.n_layers * per_layer + once


def flops_per_token(cfg: RMTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per forward MAC (2 forward, 4 backward), the Transformer++'s convention."""
    return 6.0 * macs_per_token(cfg, seq_len)


def dims(cfg: RMTConfig) -> ModelDims:
    """The planner's activation sizes: the residual matrix is the stream width, R the heads."""
    return ModelDims(cfg.residual_size, cfg.rank, cfg.vocab_size)


def tp_units(cfg: RMTConfig) -> dict[str, int]:
    return {"rank": cfg.rank}


def layout_refusal(cfg: RMTConfig, degrees: dict[str, int]) -> tuple[str, str] | None:
    """Context and expert parallelism are refused by the registry already (no core, no expert bank)."""
    if cfg.pos_encoding == "alibi" and degrees.get("tp", 1) > 1:
        return "model.pos_encoding", ("alibi's slopes depend on a head's global index, which a tensor-parallel shard "
                                      "of the heads does not know; allowed with parallel.tp > 1: learned")
    return None


def z_loss(cfg: RMTConfig) -> float:
    return cfg.z_loss_coef


# §4's scaling rows at the paper's data (GPT-2 vocabulary, 512 tokens, learned positions), with Table 9's
# corrected dimensions (bold in the spec); `1.3b` is ours: R·Dv = 2048 as the Transformer++ 1.3b's d_model,
# residual 64×128 = 8192 (4× it, as the paper's largest row), D_FF 11264 (divisible by tp 8).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_key=16, d_value=32, rank=4, n_layers=4, d_ff=512),
    "46m": dict(d_key=32, d_value=32, rank=12, n_layers=6, d_ff=1536),
    "134m": dict(d_key=32, d_value=64, rank=12, n_layers=12, d_ff=3072),
    "206m": dict(d_key=48, d_value=64, rank=14, n_layers=18, d_ff=3584),
    "305m": dict(d_key=64, d_value=64, rank=16, n_layers=24, d_ff=4096),
    "1.3b": dict(d_key=64, d_value=128, rank=16, n_layers=24, d_ff=11264, max_seq_len=2048),
}

# A head's three retrieval keys, its attention and its storage key live on one rank (reads column-, the
# write row-parallel: the writes are summed over TP); W1 column-, W2 row-parallel; the FFN's and the
# head's reads, the embeddings' writes and the norms replicated; tables split by rows (vocabulary,
# positions), the head's projection by vocabulary.
TP_PLAN = {
    "tok_embeddings.table": "vocab", "tok_embeddings.positions": "vocab",
    "layers.*.attn.read_q": "colwise", "layers.*.attn.read_k": "colwise", "layers.*.attn.read_v": "colwise",
    "layers.*.attn.write": "rowwise",
    "layers.*.ffn.w1": "colwise", "layers.*.ffn.w2": "rowwise",
    "output.proj": "colwise",
}

register(
    ModelSpec(
        name="rmt", config_cls=RMTConfig, presets=PRESETS, model_cls=RMT, tp_plan=TP_PLAN,
        pipeline_blocks=lm_pipeline_blocks, dims=dims, tp_units=tp_units, layout_refusal=layout_refusal,
        num_params=num_params, flops_per_token=flops_per_token, z_loss=z_loss,
    )
)
