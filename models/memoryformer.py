"""MemoryFormer (Ding et al., NeurIPS 2024; specs/memoryformer.md): a Transformer whose linear maps are
Memory Layers (models/layers/memory_layer.py), hash-table lookups in place of matmuls.

Block (the official code's wiring, not Eq. 13's: the Memory Block reads Norm(Z), ordinary pre-norm):

    Xn = RMSNorm(X);  Q, K, V = ML_Q(Xn), ML_K(Xn), ML_V(Xn)   # one hash of Xn shared by the three
    Z  = X + Attention(Q, K, V)                                 # RoPE on 25 % of each head, no W_O
    Y  = Z + ML2(LayerNorm(ML1(RMSNorm(Z))))                    # the Memory Block, no activation

The Memory Block widens like a 4× FFN without a matmul: "extra_bit" (the code's default) makes ML1's output
K·(τ+b) wide so ML2 hashes K chunks of τ+b bits (tables of 2^(τ+b) rows); "extra_table" makes ML1's output
2d so ML2 hashes 2K chunks of τ bits. The embedding and the dense LM head are the only matmuls left, untied.

Tensor parallelism splits every table by output columns (the built-in `table_columns` styles): Q, K and
V produce a rank's own heads directly, the attention runs on them, and the head outputs, ML1's and ML2's
outputs are gathered (there is no row-parallel layer to sum into). Each rank hashes the full, replicated
input; the weights' gradients are summed over the group on the way back (each rank's covers its columns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kernels.hashed_gather import GATHER_BACKENDS
from models.config import positive_ints
from models.init import Fill, init_module, norm_rules, normal, prefixed
from models.layers.memory_layer import MAX_CODE_BITS, SCORE_FNS, Codes, HashedMemory
from models.layers.norm import LayerNorm, RMSNorm
from models.layers.rope import RotaryEmbedding
from models.registry import ModelSpec, lm_pipeline_blocks, register

FFN_EXPAND_MODES = ("extra_bit", "extra_table")
HASH_PROJECTIONS = ("none", "dense")
FFN_MID_NORMS = ("layernorm", "rmsnorm", "none")
FFN_ACTIVATIONS = ("none", "gelu")


@dataclass
class MemoryFormerConfig:
    arch: ClassVar[str] = "memoryformer"
    tie_embeddings: ClassVar[bool] = False  # the code: untied

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int = 50304  # Pythia's padded GPT-NeoX vocabulary
    max_seq_len: int = 2048
    code_bits: int = 8  # τ: bits per chunk, 2^τ rows per table
    num_tables: int | None = None  # K: chunks of x; None: d_model / code_bits (d = K·τ is required)
    ffn_expand_bits: int = 2  # extra_bit mode: ML2 hashes τ + bits per chunk
    ffn_expand_mode: str = "extra_bit"
    temperature: float = 1.0
    score_fn: str = "official"  # the code's ‖z‖₁·p, which trained the released models; "paper": p alone
    hash_projection: str = "none"
    share_qkv_hash: bool = True
    attn_out_proj: bool = False  # a Memory Layer W_O after the heads (the paper has none)
    ffn_mid_norm: str = "layernorm"
    ffn_activation: str = "none"
    table_init_std: float | None = None  # None: the code's (Q/K/V small_init √(2/5d), others 0.02)
    use_bias: bool = True
    gather_backend: str = "auto"
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive_ints(self, "d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len", "code_bits")
        if not 1 <= self.code_bits <= MAX_CODE_BITS:
            raise ValueError(f"MemoryFormerConfig.code_bits={self.code_bits}: each table has 2^code_bits rows; "
                             f"allowed: 1..{MAX_CODE_BITS}")
        if self.d_model % self.code_bits:
            raise ValueError(f"MemoryFormerConfig.d_model={self.d_model} must be divisible by code_bits={self.code_bits} "
                             f"(d = K·τ; {self.d_model} % {self.code_bits} = {self.d_model % self.code_bits})")
        if self.num_tables is None:
            self.num_tables = self.d_model // self.code_bits
        positive_ints(self, "num_tables")
        if self.num_tables * self.code_bits != self.d_model:
            raise ValueError(f"MemoryFormerConfig.num_tables={self.num_tables} × code_bits={self.code_bits} = "
                             f"{self.num_tables * self.code_bits} must equal d_model={self.d_model}")
        self._check_choices()
        if not isinstance(self.ffn_expand_bits, int) or isinstance(self.ffn_expand_bits, bool) or self.ffn_expand_bits < 0:
            raise ValueError(f"MemoryFormerConfig.ffn_expand_bits must be an int >= 0, got {self.ffn_expand_bits!r}")
        if self.ffn_code_bits > MAX_CODE_BITS:
            raise ValueError(f"MemoryFormerConfig.ffn_expand_bits={self.ffn_expand_bits}: ML2's tables have "
                             f"2^(code_bits + ffn_expand_bits) = 2^{self.ffn_code_bits} rows; allowed: "
                             f"code_bits + ffn_expand_bits <= {MAX_CODE_BITS}")
        self._check_numbers()
        if self.d_model % self.n_heads:
            raise ValueError(f"MemoryFormerConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.rotary_dim % 2:
            raise ValueError(f"MemoryFormerConfig.rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives "
                             f"{self.rotary_dim} rotary dims; rotary needs an even number")

    def _check_choices(self) -> None:
        for name, allowed in (("ffn_expand_mode", FFN_EXPAND_MODES), ("score_fn", SCORE_FNS),
                              ("hash_projection", HASH_PROJECTIONS), ("ffn_mid_norm", FFN_MID_NORMS),
                              ("ffn_activation", FFN_ACTIVATIONS), ("gather_backend", GATHER_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MemoryFormerConfig.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")

    def _check_numbers(self) -> None:
        for name in ("temperature", "rope_theta", "norm_eps", "init_std", "table_init_std"):
            value = getattr(self, name)
            if value is None and name == "table_init_std":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MemoryFormerConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.rotary_pct, (int, float)) or not 0 <= self.rotary_pct <= 1:
            raise ValueError(f"MemoryFormerConfig.rotary_pct must be in [0, 1], got {self.rotary_pct!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)  # Pythia's rotary_ndims

    @property
    def ffn_width(self) -> int:
        """ML1's output width: K·(τ + bits) in extra_bit mode, 2d in extra_table mode."""
        if self.ffn_expand_mode == "extra_bit":
            return self.num_tables * self.ffn_code_bits
        return 2 * self.d_model

    @property
    def ffn_code_bits(self) -> int:
        """ML2's bits per chunk."""
        return self.code_bits + (self.ffn_expand_bits if self.ffn_expand_mode == "extra_bit" else 0)


def _memory(cfg: MemoryFormerConfig, d_in: int, d_out: int, code_bits: int, projection: bool = True) -> HashedMemory:
    return HashedMemory(d_in, d_out, code_bits, temperature=cfg.temperature, score_fn=cfg.score_fn,
                        projection=projection and cfg.hash_projection == "dense", bias=cfg.use_bias,
                        backend=cfg.gather_backend)


class HeadOutputs(nn.Module):
    """The heads' outputs concatenated, [B, T, H·hd]: an identity that marks where a tensor-parallel shard's
    own heads are gathered (the `gathered_columns` TP style), since no W_O follows to sum them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MemoryAttention(nn.Module):
    """Causal multi-head attention with Memory Layer Q, K, V sharing one hash of the input; no W_O."""

    def __init__(self, cfg: MemoryFormerConfig):
        super().__init__()
        d, tau, shared = cfg.d_model, cfg.code_bits, cfg.share_qkv_hash
        self.head_dim, self.rotary_dim, self.share_hash = cfg.head_dim, cfg.rotary_dim, shared
        self.q = _memory(cfg, d, d, tau)
        self.k = _memory(cfg, d, d, tau, projection=not shared)  # with a shared hash only q's projection is used
        self.v = _memory(cfg, d, d, tau, projection=not shared)
        self.rope = RotaryEmbedding(self.rotary_dim, cfg.max_seq_len, cfg.rope_theta) if self.rotary_dim else None
        self.heads = HeadOutputs()
        self.out = _memory(cfg, d, d, tau) if cfg.attn_out_proj else None

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.rope is None:
            return x
        return torch.cat((self.rope(x[..., :self.rotary_dim], start), x[..., self.rotary_dim:]), dim=-1)

    def qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, T, H, hd] (H: this shard's heads), q and k rotated for positions start.."""
        codes: Codes | None = self.q.codes(x) if self.share_hash else None
        q, k, v = (m(x, codes).unflatten(-1, (-1, self.head_dim)) for m in (self.q, self.k, self.v))
        return self._rotate(q, start), self._rotate(k, start), v

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        a = self.heads(y.transpose(1, 2).flatten(2))
        return self.out(a) if self.out is not None else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x))
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row, x [B, 1, d]; `cache` keeps this layer's keys and values."""
        pos = cache.get("pos", 0)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, pos))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache.update(k=k, v=v, pos=pos + 1)
        return self._out(F.scaled_dot_product_attention(q, k, v))


class MemoryBlock(nn.Module):
    """The FFN's replacement: ML2(act(Norm(ML1(x)))), d → ffn_width → d, each layer hashing its own input."""

    def __init__(self, cfg: MemoryFormerConfig):
        super().__init__()
        d, w = cfg.d_model, cfg.ffn_width
        self.ml1 = _memory(cfg, d, w, cfg.code_bits)
        self.mid_norm = {"layernorm": lambda: LayerNorm(w, cfg.norm_eps), "rmsnorm": lambda: RMSNorm(w, cfg.norm_eps),
                         "none": nn.Identity}[cfg.ffn_mid_norm]()
        self.gelu = cfg.ffn_activation == "gelu"
        self.ml2 = _memory(cfg, w, d, cfg.ffn_code_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid_norm(self.ml1(x))
        return self.ml2(F.gelu(h) if self.gelu else h)


class MemoryFormerBlock(nn.Module):
    def __init__(self, cfg: MemoryFormerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MemoryAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MemoryBlock(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x + self.attn(self.attn_norm(x))
        return z + self.ffn(self.ffn_norm(z))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        z = x + self.attn.step(self.attn_norm(x), cache)
        return z + self.ffn(self.ffn_norm(z))


class MemoryFormer(nn.Module):
    def __init__(self, cfg: MemoryFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MemoryFormerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        """The code's: tables 0.02·N(0, 1), Q/K/V's small_init N(0, 2/(5d)) (`table_init_std` overrides both),
        biases 0.001·N(0, 1), embedding, head and hash projections N(0, init_std²), norms gain 1 bias 0."""
        c = self.cfg
        qkv_std = c.table_init_std or math.sqrt(2 / (5 * c.d_model))
        other_std = c.table_init_std or 0.02
        rules = {"tok_embeddings.weight": normal(c.init_std), "output.weight": normal(c.init_std)}
        rules |= prefixed("norm", norm_rules(self.norm))
        for i, layer in enumerate(self.layers):
            for name, module in layer.named_modules(prefix=f"layers.{i}"):
                if isinstance(module, HashedMemory):
                    std = qkv_std if name.rsplit(".", 1)[-1] in ("q", "k", "v") else other_std
                    rules |= _memory_rules(name, module, std, c.init_std)
                elif isinstance(module, (RMSNorm, LayerNorm)):
                    rules |= prefixed(name, norm_rules(module))
        return rules

    def init_weights(self, seed: int | None = None) -> None:
        init_module(self, self.init_rules(), seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab_size]."""
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


def _memory_rules(name: str, module: HashedMemory, table_std: float, proj_std: float) -> dict[str, Fill]:
    rules = {f"{name}.memory.tables": normal(table_std)}
    if module.memory.bias is not None:
        rules[f"{name}.memory.bias"] = normal(0.001)
    if module.projection is not None:
        rules[f"{name}.projection.weight"] = normal(proj_std)
    return rules


# --- tensor parallelism: tables split by output columns (parallel/tp_styles.py's table styles) ------------

SEQUENCE_PARALLEL_REFUSAL = (
    "MemoryFormer splits its tables by output columns and has no row-parallel layer (no W_O; ML2's output is "
    "gathered, not summed), so there is no reduce-scatter to carry a sequence shard; allowed: false")

TP_PLAN = {
    "tok_embeddings": "vocab",
    "layers.*.attn.q.memory": "table_columns", "layers.*.attn.k.memory": "table_columns",
    "layers.*.attn.v.memory": "table_columns",
    "layers.*.attn.heads": "gathered_columns",
    "layers.*.attn.out.memory": "table_columns_gathered",
    "layers.*.ffn.ml1.memory": "table_columns_gathered", "layers.*.ffn.ml2.memory": "table_columns_gathered",
    "output": "colwise",
}


# --- accounting (spec §3, §5) ----------------------------------------------------------------------

def memory_layers(cfg: MemoryFormerConfig) -> dict[str, tuple[int, int, int]]:
    """Each Memory Layer of one block: name -> (tables K, bits τ, output width h)."""
    K, tau, d = cfg.num_tables, cfg.code_bits, cfg.d_model
    layers = {"q": (K, tau, d), "k": (K, tau, d), "v": (K, tau, d)}
    if cfg.attn_out_proj:
        layers["out"] = (K, tau, d)
    layers["ml1"] = (K, tau, cfg.ffn_width)
    layers["ml2"] = (cfg.ffn_width // cfg.ffn_code_bits, cfg.ffn_code_bits, d)
    return layers


def table_params_per_layer(cfg: MemoryFormerConfig) -> dict[str, int]:
    """Table entries K·2^τ·h of each Memory Layer of one block (spec §3: 69.2M per MF-tiny block)."""
    return {name: K * 2 ** tau * h for name, (K, tau, h) in memory_layers(cfg).items()}


def num_params(cfg: MemoryFormerConfig) -> int:
    d = cfg.d_model
    per_layer = 2 * d + sum(table_params_per_layer(cfg).values())
    mls = memory_layers(cfg)
    if cfg.use_bias:
        per_layer += sum(h for _, _, h in mls.values())
    per_layer += {"layernorm": 2, "rmsnorm": 1, "none": 0}[cfg.ffn_mid_norm] * cfg.ffn_width
    if cfg.hash_projection == "dense":
        hashed = [n for n in mls if n not in ("k", "v") or not cfg.share_qkv_hash]
        per_layer += sum((mls[n][0] * mls[n][1]) ** 2 for n in hashed)
    return cfg.n_layers * per_layer + d + 2 * cfg.vocab_size * d


def paper_block_macs(cfg: MemoryFormerConfig, seq_len: int) -> float:
    """The paper's non-attention cost of one block at length s, (6/τ)·s·d² = 6·K·s·d (Table 1's 0.4G / 1.0G /
    1.6G for tiny / small / base at s = 2048)."""
    return 6 * cfg.num_tables * seq_len * cfg.d_model


def macs_per_token(cfg: MemoryFormerConfig, seq_len: int) -> int:
    """Forward multiply-accumulates per token, counted exactly: every gathered row times its weight (K·h per
    Memory Layer), the hash projections, attention scores and values over the full T×T matrix, the head."""
    mls = memory_layers(cfg)
    per_layer = sum(K * h for K, _, h in mls.values()) + 2 * seq_len * cfg.d_model
    if cfg.hash_projection == "dense":
        per_layer += sum((mls[n][0] * mls[n][1]) ** 2 for n in mls if n not in ("k", "v") or not cfg.share_qkv_hash)
    return cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: MemoryFormerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per forward MAC (a gather's backward is two more: ∂w and the table scatter)."""
    return 6.0 * macs_per_token(cfg, seq_len)


def table_bytes(cfg: MemoryFormerConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """Storage of one block's tables by layer (fp16 default: Table 3's 16.8 MB for layer Q of MF-tiny)."""
    return {name: n * bytes_per_value for name, n in table_params_per_layer(cfg).items()}


def layout_refusal(cfg: MemoryFormerConfig, degrees: dict[str, int]) -> tuple[str, str] | None:
    """Context and expert parallelism are refused by the registry already (no core, no expert bank)."""
    if degrees.get("sp"):
        return "parallel.sequence_parallel", SEQUENCE_PARALLEL_REFUSAL
    return None


# Spec §3 at τ = 8 (Pythia dims); `tiny` for CPU tests: d 64 = 8 tables of 8 bits, 4 heads of 16 (4 rotary
# dims), 2 blocks, ML1 64 → 80, ML2 8 tables of 1024 rows; `1.3b` is the dense baseline's 1.3b dims at τ = 8
# (K = 256): 26.6B table entries, which `launcher plan` shows as they are.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=8192),
    "mf-tiny": dict(d_model=512, n_layers=6, n_heads=8),
    "mf-small": dict(d_model=768, n_layers=12, n_heads=12),
    "mf-base": dict(d_model=1024, n_layers=24, n_heads=16),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
}

register(
    ModelSpec(
        name="memoryformer", config_cls=MemoryFormerConfig, presets=PRESETS, model_cls=MemoryFormer,
        tp_plan=TP_PLAN, pipeline_blocks=lm_pipeline_blocks, layout_refusal=layout_refusal,
        num_params=num_params, flops_per_token=flops_per_token, table_params="*.memory.tables",
    )
)
