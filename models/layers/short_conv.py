"""Causal depthwise short convolution (DeltaNet's q/k/v pre-mixing, width 4), varlen-aware.

Written as a sum of W shifted products rather than `conv1d`, so the same code handles sequence
boundaries inside a packed row (a token never reads a previous sequence), left context coming
from elsewhere (the previous context-parallel rank's last rows, or a generation cache), and
one-token decoding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.init import Fill, init_module, uniform


class ShortConv(nn.Module):
    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.width = width
        # weight[:, -1] multiplies the current token (conv1d's layout, weight [C, W] = Conv1d's [C, 1, W]).
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.reset_parameters()

    def init_rules(self) -> dict[str, Fill]:
        bound = 1 / math.sqrt(self.width)  # nn.Conv1d's default for a depthwise kernel (fan_in = W)
        return {"weight": uniform(-bound, bound)}

    def reset_parameters(self) -> None:
        init_module(self, self.init_rules())

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor | None = None, left: torch.Tensor | None = None,
                left_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C] (no activation).

        seq_ids [T]: sequence index of each token (None: one sequence per row). left [B, W-1, C]: the
        W-1 rows before x (None: zeros); left_ids [W-1]: their sequence ids (rows of another
        sequence, e.g. -1, are ignored).
        """
        W, T = self.width, x.shape[1]
        if left is None:
            left = x.new_zeros(x.shape[0], W - 1, x.shape[2])
        ctx = torch.cat([left.to(x.dtype), x], dim=1)
        ids = None
        if seq_ids is not None or left_ids is not None:
            own = seq_ids if seq_ids is not None else torch.zeros(T, dtype=torch.long, device=x.device)
            prev = left_ids if left_ids is not None else torch.full((W - 1,), -1, dtype=own.dtype, device=x.device)
            ids = torch.cat([prev.to(own.dtype), own])
        y = x * self.weight[:, -1]
        for j in range(1, W):  # the token j steps back
            shifted = ctx[:, W - 1 - j: W - 1 - j + T]
            if ids is not None:
                shifted = shifted * (ids[W - 1 - j: W - 1 - j + T] == ids[W - 1:]).to(x.dtype)[None, :, None]
            y = y + shifted * self.weight[:, W - 1 - j]
        return y
