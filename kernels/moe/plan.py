"""The routing plan: where every (row, choice) assignment goes in expert-sorted, block-padded order.

Integer torch ops only, no host sync and no gradient, the same code on CPU and GPU, so the plan is
bitwise identical everywhere (spec §3.1). Assignment slot f numbers the entries of the expert-id
tensor in row-major order; slot f reads input row f // fan_in and writes output row f // fan_out
(σ-MoE: fan_in = fan_out = k; SwitchHead V: fan_in = H·2, fan_out = 2; SwitchHead O: the reverse).
Each expert's rows start on a multiple of `block`, so a block-row tile belongs to one expert; the
padded buffer has the static size bound F + E·(block − 1), rounded up to whole tiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingPlan:
    order: torch.Tensor  # [F] sorted position i -> slot f (stable sort by expert)
    dst: torch.Tensor  # [F] padded row of sorted entry i
    src: torch.Tensor  # [F] input row read by sorted entry i (order // fan_in)
    slot_row: torch.Tensor  # [F] padded row of slot f (dst in slot order)
    counts: torch.Tensor  # [E] assignments per expert
    padded_offsets: torch.Tensor  # [E + 1] first padded row of each expert, then the end of the last
    tile_expert: torch.Tensor  # [n_tiles] expert owning rows [b·block, (b+1)·block); -1 past the end
    num_experts: int
    block: int
    fan_in: int
    fan_out: int

    @property
    def slots(self) -> int:
        return self.order.numel()

    @property
    def rows(self) -> int:
        """Rows of the padded buffers (a static bound: whole tiles)."""
        return self.tile_expert.numel() * self.block

    @property
    def n_in(self) -> int:
        return self.slots // self.fan_in

    @property
    def n_out(self) -> int:
        return self.slots // self.fan_out


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])


@torch.no_grad()
def make_plan(expert_ids: torch.Tensor, num_experts: int, *, fan_in: int, fan_out: int,
              block: int = 64) -> RoutingPlan:
    """Plan for the integer `expert_ids` (any shape, values in [0, num_experts)); see the module doc."""
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    flat = expert_ids.reshape(-1).long()
    n = flat.numel()
    for name, value in (("num_experts", num_experts), ("fan_in", fan_in), ("fan_out", fan_out), ("block", block)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n % fan_in or n % fan_out:
        raise ValueError(f"{n} assignments are not a whole number of rows for fan_in={fan_in}, fan_out={fan_out}")
    order = torch.sort(flat, stable=True).indices
    bins = flat[order]
    counts = torch.bincount(flat, minlength=num_experts)
    if counts.numel() != num_experts:
        raise ValueError(f"expert ids reach {counts.numel() - 1}, beyond num_experts={num_experts}")
    offsets = _exclusive_cumsum(counts)
    padded = _exclusive_cumsum((counts + block - 1) // block * block)
    dst = padded[bins] + torch.arange(n, device=flat.device) - offsets[bins]
    slot_row = torch.empty_like(dst)
    slot_row[order] = dst
    n_tiles = -(-(n + num_experts * (block - 1)) // block)
    starts = torch.arange(n_tiles, device=flat.device) * block
    tile_expert = torch.searchsorted(padded[1:], starts, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, torch.full_like(tile_expert, -1))
    return RoutingPlan(order=order, dst=dst, src=order // fan_in, slot_row=slot_row, counts=counts,
                       padded_offsets=padded, tile_expert=tile_expert, num_experts=num_experts, block=block,
                       fan_in=fan_in, fan_out=fan_out)
