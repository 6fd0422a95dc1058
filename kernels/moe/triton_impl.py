"""Triton path of the dispatch primitives: autograd Functions and launches (kernels in triton_kernels).

Same functions, forward and backward, as `torch_impl` (gather, grouped_mm, scatter); deterministic (no
atomics, fixed-order sums over fan-in / fan-out / rows, fp32 accumulation, IEEE matmuls). No host sync:
grids come from the static plan sizes (plan.rows, plan.slots) and tile_expert / padded_offsets / counts are
read on the device. Padding rows of every padded output (xs, ys, dxs, dys) are written as zeros.
"""
from __future__ import annotations

import torch
import triton

from kernels.moe import triton_kernels as tk
from kernels.moe.plan import RoutingPlan

BN, BK = 64, 32  # grouped_mm output-column and reduction tiles
BK_DW, BN_DW = 64, 64  # dW tiles (d_in × d_out); the reduction runs over BM rows per step
BR = 32  # output rows per program of the fan sums
MAX_BD = 128  # feature tile of gather / scatter
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch(num_warps: int = 4) -> dict:
    """One fixed config (no autotuning yet)."""
    return dict(num_warps=num_warps, num_stages=2)


def _bd(d: int) -> int:
    return max(16, min(MAX_BD, triton.next_power_of_2(max(d, 1))))


def _check(plan: RoutingPlan, *tensors: torch.Tensor) -> None:
    b = plan.block
    if b < 16 or b & (b - 1):
        raise ValueError(f"the Triton MoE path needs plan.block a power of two ≥ 16 (tl.dot), got {b}")
    for t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(f"the Triton MoE path runs fp32/fp16/bf16, got {t.dtype}")
        if t.device != plan.order.device:
            raise ValueError(f"tensor on {t.device}, plan on {plan.order.device}")


def _entry_off(plan: RoutingPlan) -> torch.Tensor:
    """First sorted entry of each expert (exclusive cumsum of counts), on the device."""
    return torch.cumsum(plan.counts, 0) - plan.counts


def _padded(plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return plan.tile_expert, plan.padded_offsets, plan.counts


def _fan_sum(buf: torch.Tensor, plan: RoutingPlan, fan: int, gates: torch.Tensor | None, out_dtype) -> torch.Tensor:  # noqa: ANN001
    n, d = plan.slots // fan, buf.shape[-1]
    out = buf.new_empty(n, d, dtype=out_dtype)
    if n and d:
        BD = _bd(d)
        tk.fan_sum_kernel[(triton.cdiv(n, BR), triton.cdiv(d, BD))](
            buf, out, plan.slot_row, gates if gates is not None else buf, n, d, fan, gates is not None, BR, BD,
            **_launch())
    return out


def _mm(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, transpose: bool) -> torch.Tensor:
    """Per-tile a @ W[e] (or a @ W[e]ᵀ: the strides of W swapped, nothing materialised)."""
    s_e, s_k, s_n = w.stride()
    K, N = w.shape[1:]
    if transpose:
        s_k, s_n, K, N = s_n, s_k, N, K
    c = a.new_empty(a.shape[0], N)
    if c.numel():
        tk.grouped_mm_kernel[(plan.tile_expert.numel(), triton.cdiv(N, BN))](
            a, w, c, *_padded(plan), K, N, s_e, s_k, s_n, plan.block, BN, BK, **_launch())
    return c


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # noqa: ANN001
        _check(plan, x)
        ctx.plan = plan
        x = x.contiguous()
        d = x.shape[-1]
        xs = x.new_empty(plan.rows, d)
        if xs.numel():
            BD = _bd(d)
            tk.gather_kernel[(plan.tile_expert.numel(), triton.cdiv(d, BD))](
                x, xs, plan.src, *_padded(plan), _entry_off(plan), d, plan.block, BD, **_launch())
        return xs

    @staticmethod
    def backward(ctx, dxs: torch.Tensor):  # noqa: ANN001, ANN205
        return _fan_sum(dxs.contiguous(), ctx.plan, ctx.plan.fan_in, None, dxs.dtype), None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:  # noqa: ANN001
        _check(plan, xs, w)
        if xs.dtype != w.dtype:
            raise TypeError(f"grouped_mm: xs is {xs.dtype}, w is {w.dtype}")
        if xs.shape[0] != plan.rows or w.shape[0] != plan.num_experts or xs.shape[1] != w.shape[1]:
            raise ValueError(f"grouped_mm: xs {tuple(xs.shape)}, w {tuple(w.shape)}, plan rows {plan.rows}")
        xs = xs.contiguous()
        ctx.plan = plan
        ctx.save_for_backward(xs, w)
        return _mm(xs, w, plan, transpose=False)

    @staticmethod
    def backward(ctx, dys: torch.Tensor):  # noqa: ANN001, ANN205
        xs, w = ctx.saved_tensors
        plan = ctx.plan
        dys = dys.contiguous()
        dxs = _mm(dys, w, plan, transpose=True) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            E, K, N = w.shape
            dw = w.new_empty(E, K, N)
            if dw.numel():
                tk.grouped_mm_dw_kernel[(E, triton.cdiv(K, BK_DW), triton.cdiv(N, BN_DW))](
                    xs, dys, dw, plan.padded_offsets, plan.counts, K, N, plan.block, BK_DW, BN_DW, **_launch())
        return dxs, dw, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        _check(plan, ys, gates)
        if gates.numel() != plan.slots:
            raise ValueError(f"scatter: {gates.numel()} gates for {plan.slots} slots")
        ys, g = ys.contiguous(), gates.reshape(-1).contiguous()
        ctx.plan, ctx.gates_shape = plan, gates.shape
        ctx.save_for_backward(ys, g)
        return _fan_sum(ys, plan, plan.fan_out, g, ys.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        ys, g = ctx.saved_tensors
        plan = ctx.plan
        want_dys, want_dg = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (want_dys or want_dg):
            return None, None, None
        dy = dy.contiguous()
        d = ys.shape[-1]
        dys = torch.empty_like(ys) if want_dys else ys
        dg = torch.empty_like(g) if want_dg else g
        if plan.rows:
            tk.scatter_bwd_kernel[(plan.tile_expert.numel(),)](
                ys, dy, g, plan.order, dys, dg, *_padded(plan), _entry_off(plan), d, plan.fan_out, want_dys,
                want_dg, plan.block, min(64, _bd(d)), **_launch())
        return (dys if want_dys else None), None, (dg.view(ctx.gates_shape) if want_dg else None)


def gather_triton(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return _Gather.apply(x, plan)


def grouped_mm_triton(xs: torch.Tensor, w: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return _GroupedMM.apply(xs, w, plan)


def scatter_triton(ys: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor) -> torch.Tensor:
    return _Scatter.apply(ys, plan, gates)
