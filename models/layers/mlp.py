import torch
import torch.nn.functional as F
from torch import nn

from models.init import Fill, init_module, normal


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def init_rules(self, init_std: float, out_std: float) -> dict[str, Fill]:
        return {"w_gate.weight": normal(init_std), "w_up.weight": normal(init_std), "w_down.weight": normal(out_std)}

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_module(self, self.init_rules(init_std, out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
