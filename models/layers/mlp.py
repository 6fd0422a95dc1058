import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate.weight, std=init_std)
        nn.init.normal_(self.w_up.weight, std=init_std)
        nn.init.normal_(self.w_down.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
