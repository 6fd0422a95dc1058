import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or float64 when it already is: statistics never run in 16 bits, float64 oracles stay float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16/fp16 mean-of-squares loses precision over wide rows: normalise in fp32, cast back.
        xf = upcast(x)
        y = F.rms_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.eps)
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with gain and bias, statistics in fp32 (as RMSNorm): MemoryFormer's norm between its two
    Memory Layers."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        if not self.weight.is_meta:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = F.layer_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.bias.to(xf.dtype), self.eps)
        return y.to(x.dtype)
