"""Pure-torch dispatch primitives (the CPU path): indexing plus a loop of `torch.mm` over expert segments.

Each primitive is an autograd Function with a hand-written backward so that no gradient goes through an
index_add (atomic, order-dependent on a GPU): sums over fan-in / fan-out are `view(..., fan, d).sum(1)`,
a fixed order, and each padded row has exactly one writer. Padding rows stay zero throughout.
"""
from __future__ import annotations

import torch

from kernels.moe.plan import RoutingPlan


def _segments(plan: RoutingPlan) -> list[tuple[int, int, int]]:
    """(expert, first row, row count) of every non-empty expert (counts to the host: fine on CPU)."""
    counts, starts = plan.counts.tolist(), plan.padded_offsets.tolist()
    return [(e, starts[e], c) for e, c in enumerate(counts) if c]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # noqa: ANN001
        ctx.plan = plan
        xs = x.new_zeros(plan.rows, x.shape[-1])
        xs[plan.dst] = x[plan.src]
        return xs

    @staticmethod
    def backward(ctx, dxs: torch.Tensor):  # noqa: ANN001, ANN205
        plan = ctx.plan
        return dxs[plan.slot_row].view(plan.n_in, plan.fan_in, -1).sum(1), None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # noqa: ANN001
        ctx.plan = plan
        ctx.save_for_backward(xs, w)
        ys = xs.new_zeros(xs.shape[0], w.shape[-1])
        for e, start, n in _segments(plan):
            torch.mm(xs[start:start + n], w[e], out=ys[start:start + n])
        return ys

    @staticmethod
    def backward(ctx, dys: torch.Tensor):  # noqa: ANN001, ANN205
        xs, w = ctx.saved_tensors
        dxs = torch.zeros_like(xs) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for e, start, n in _segments(ctx.plan):
            rows = slice(start, start + n)
            if dxs is not None:
                torch.mm(dys[rows], w[e].t(), out=dxs[rows])
            if dw is not None:
                torch.mm(xs[rows].t(), dys[rows], out=dw[e])
        return dxs, dw, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.plan = plan
        ctx.save_for_backward(ys, gates)
        picked = ys[plan.slot_row] * gates.reshape(-1, 1).to(ys.dtype)
        return picked.view(plan.n_out, plan.fan_out, -1).sum(1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        ys, gates = ctx.saved_tensors
        plan = ctx.plan
        dy_slot = dy.repeat_interleave(plan.fan_out, dim=0)  # dy[f // fan_out]
        dys = dgates = None
        if ctx.needs_input_grad[0]:
            dys = torch.zeros_like(ys)
            dys[plan.slot_row] = dy_slot * gates.reshape(-1, 1).to(dy.dtype)
        if ctx.needs_input_grad[2]:
            dgates = (ys[plan.slot_row] * dy_slot).sum(-1).to(gates.dtype).view_as(gates)
        return dys, None, dgates


def gather_torch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return _Gather.apply(x, plan)


def grouped_mm_torch(xs: torch.Tensor, w: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return _GroupedMM.apply(xs, w, plan)


def scatter_torch(ys: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor) -> torch.Tensor:
    return _Scatter.apply(ys, plan, gates)
