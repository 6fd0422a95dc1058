"""MemoryFormer's Memory Layer (Ding et al. 2024, specs/memoryformer.md §1): a linear map x ∈ R^d → R^h
replaced by K hash-table lookups.

x is split into K contiguous chunks z_k of τ = d/K values; each chunk's sign pattern picks one row of its
own table T_k ∈ R^{2^τ × h} (full width h), and the K rows are summed, each weighted by how far the chunk
is from a sign flip: y = Σ_k w(z_k) · T_k[h(z_k)] + b. The hash is piecewise constant (no gradient, no
straight-through estimator); x learns only through the weight.

The hash and the weight are computed once per input (`hash_input`) and may be shared by several layers
reading the same input (the attention's Q, K and V): `MemoryLayer.forward` takes them, not x.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.hashed_gather import GatherPlan, make_gather_plan, weighted_gather

SCORE_FNS = ("official", "paper")
MAX_CODE_BITS = 20  # 2^20 rows per table: beyond it a table of a few columns is already gigabytes


@dataclass
class Codes:
    """One input's hash: flat row indices into the K stacked tables, and their weights, both [..., K]."""

    index: torch.Tensor  # int64, chunk k's bucket + k·2^τ
    weight: torch.Tensor
    _plans: dict[int, GatherPlan] = field(default_factory=dict, repr=False)

    def plan(self, rows: int) -> GatherPlan | None:
        """The table gradient's sort of `index`, made once and shared by every layer reading these codes
        (Q, K, V: one sort instead of three); None outside training, where no table gradient is taken."""
        if not torch.is_grad_enabled():
            return None
        if rows not in self._plans:
            self._plans[rows] = make_gather_plan(self.index, rows)
        return self._plans[rows]


def bucket(z: torch.Tensor) -> torch.Tensor:
    """z [..., τ] -> int64 bucket Σ_i [z_i ≥ 0]·2^(τ−1−i): coordinate 0 is the most significant bit (the
    official code's order), so the all-non-negative chunk is 2^τ − 1."""
    tau = z.shape[-1]
    powers = 2 ** torch.arange(tau - 1, -1, -1, device=z.device, dtype=torch.int64)
    return ((z >= 0).to(torch.int64) * powers).sum(-1)


def code_probability(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The softmax over all 2^τ codes s ∈ {±1}^τ of ⟨z, s⟩/t, at s = sign(z) (Eq. 8–10), in closed form:
    Π_i σ(2|z_i|/t). Summed in log space so a long chunk does not underflow before the product."""
    return torch.exp(F.logsigmoid(2 * z.abs() / temperature).sum(-1))


def code_weight(z: torch.Tensor, temperature: float, score_fn: str) -> torch.Tensor:
    """The weight of chunk z's row: the paper's p(z) or the official code's ‖z‖₁·p(z), which keeps a table's
    contribution O(1) (E ≈ 0.97 for N(0, 1) inputs at τ = 8, against E[p] ≈ 0.13)."""
    p = code_probability(z, temperature)
    if score_fn == "paper":
        return p
    if score_fn == "official":
        return z.abs().sum(-1) * p
    raise ValueError(f"score_fn={score_fn!r}; allowed: {', '.join(SCORE_FNS)}")


def hash_input(x: torch.Tensor, code_bits: int, temperature: float = 1.0, score_fn: str = "official") -> Codes:
    """x [..., K·τ] -> Codes of its K chunks (fp32 weights, float64 for a float64 input)."""
    if x.shape[-1] % code_bits:
        raise ValueError(f"input width {x.shape[-1]} is not divisible by code_bits={code_bits}")
    z = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, code_bits))
    n_tables = z.shape[-2]
    offsets = torch.arange(n_tables, device=x.device, dtype=torch.int64) * 2 ** code_bits
    return Codes(bucket(z) + offsets, code_weight(z, temperature, score_fn))


class MemoryLayer(nn.Module):
    """K stacked tables [K·2^τ, h] and a bias [h]: y = Σ_k w_k·tables[index_k] + bias.

    Under tensor parallelism the tables are split by output columns (models/memoryformer.py): the same
    code runs on a column shard, its width read off the table."""

    def __init__(self, n_tables: int, code_bits: int, d_out: int, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.n_tables, self.code_bits, self.backend = n_tables, code_bits, backend
        self.tables = nn.Parameter(torch.empty(n_tables * 2 ** code_bits, d_out))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    @property
    def d_in(self) -> int:
        return self.n_tables * self.code_bits

    def forward(self, index: torch.Tensor, weight: torch.Tensor, plan: GatherPlan | None = None) -> torch.Tensor:
        """index, weight [..., K] (from `hash_input`) -> [..., h] in the tables' dtype; `plan`: the index's
        sort for the table gradient, when shared (`Codes.plan`)."""
        y = weighted_gather(self.tables, index, weight, backend=self.backend, plan=plan)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"n_tables={self.n_tables}, code_bits={self.code_bits}, d_out={self.tables.shape[1]}, "
                f"bias={self.bias is not None}")


class HashedMemory(nn.Module):
    """A Memory Layer with its own hash (and the optional dense projection before it, off in every
    released config): x [..., d_in] -> [..., h]."""

    def __init__(self, d_in: int, d_out: int, code_bits: int, *, temperature: float, score_fn: str,
                 projection: bool, bias: bool, backend: str):
        super().__init__()
        self.code_bits, self.temperature, self.score_fn = code_bits, temperature, score_fn
        self.projection = nn.Linear(d_in, d_in, bias=False) if projection else None
        self.memory = MemoryLayer(d_in // code_bits, code_bits, d_out, bias, backend)

    def codes(self, x: torch.Tensor) -> Codes:
        if self.projection is not None:
            x = self.projection(x)
        return hash_input(x, self.code_bits, self.temperature, self.score_fn)

    def forward(self, x: torch.Tensor, codes: Codes | None = None) -> torch.Tensor:
        """`codes`: a hash of x already computed (shared with other layers); None: hash x here."""
        shared = codes is not None
        codes = codes if shared else self.codes(x)
        plan = codes.plan(self.memory.tables.shape[0]) if shared and self.memory.tables.requires_grad else None
        return self.memory(codes.index, codes.weight, plan=plan)
