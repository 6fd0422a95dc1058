"""Triton path of the weighted gather: the autograd Function and the launches (kernels in triton_kernels).

Same function, forward and backward, as torch_impl: y in the tables' dtype with fp32 accumulation, ∂T in
the tables' dtype, ∂w in w's dtype (the kernels read and write w in fp32). Deterministic: ∂T is the
sorted segmented sum of torch_impl's GatherPlan (one program per selected row, no atomics), ∂w and y are
fixed-order sums. Building the plan syncs with the host once (its row count sizes the ∂T grid); the
forward and ∂w launches are sized from shapes alone.
"""
from __future__ import annotations

import torch
import triton

from kernels.hashed_gather import triton_kernels as tk
from kernels.hashed_gather.torch_impl import GatherPlan, check_plan, flatten_inputs, make_gather_plan

BN = 32  # rows n per forward program
BM = 32  # entries (n, k) per ∂w program
BS = 32  # sorted entries per step of a ∂T segment
MAX_BH = 128  # column tile of every kernel
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch(num_warps: int = 4) -> dict:
    """One fixed config (no autotuning yet)."""
    return dict(num_warps=num_warps, num_stages=2)


def _bh(h: int) -> int:
    return max(16, min(MAX_BH, triton.next_power_of_2(max(h, 1))))


def _check(tables: torch.Tensor, idx: torch.Tensor) -> None:
    if tables.dtype not in DTYPES:
        raise TypeError(f"the Triton weighted gather runs fp32/fp16/bf16 tables, got {tables.dtype}")
    if idx.device != tables.device:
        raise ValueError(f"idx on {idx.device}, tables on {tables.device}")


def _weight_grad(tables: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    M, H = idx.numel(), tables.shape[-1]
    dw = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
    if M:
        tk.gather_dw_kernel[(triton.cdiv(M, BM),)](tables, idx, dy, dw, M, H, idx.shape[-1], BM, _bh(H),
                                                   **_launch())
    return dw


def _table_grad(tables: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    H = tables.shape[-1]
    dT = torch.zeros_like(tables)  # rows never selected get no program
    if plan.segments and H:
        BH = _bh(H)
        tk.gather_dtable_kernel[(plan.segments, triton.cdiv(H, BH))](
            dy, w, plan.order, plan.rows, plan.offsets, dT, H, w.shape[-1], BS, BH, **_launch())
    return dT


class _TritonGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,  # noqa: ANN001
                plan: GatherPlan | None) -> torch.Tensor:
        _check(tables, idx)
        tables, idx, w32 = tables.contiguous(), idx.contiguous(), w.float().contiguous()
        ctx.plan, ctx.w_dtype = plan, w.dtype
        ctx.save_for_backward(tables, idx, w32)
        (N, K), H = idx.shape, tables.shape[-1]
        y = tables.new_empty(N, H)
        if y.numel():
            BH = _bh(H)
            tk.gather_fwd_kernel[(triton.cdiv(N, BN), triton.cdiv(H, BH))](tables, idx, w32, y, N, H, K, BN, BH,
                                                                          **_launch())
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        tables, idx, w32 = ctx.saved_tensors
        dy = dy.to(tables.dtype).contiguous()
        dT = dw = None
        if ctx.needs_input_grad[0]:
            plan = ctx.plan or make_gather_plan(idx, tables.shape[0])
            dT = _table_grad(tables, dy, w32, plan)
        if ctx.needs_input_grad[2]:
            dw = _weight_grad(tables, idx, dy).to(ctx.w_dtype)
        return dT, None, dw, None


def weighted_gather_triton(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                           plan: GatherPlan | None = None) -> torch.Tensor:
    """The Triton weighted gather: tables [R, h], idx / w [..., K] -> [..., h]; see weighted_gather_torch."""
    flat_idx, flat_w = flatten_inputs(tables, idx, w)
    if plan is not None:
        check_plan(plan, flat_idx, tables.shape[0])
    y = _TritonGather.apply(tables, flat_idx, flat_w, plan)
    return y.reshape(*idx.shape[:-1], tables.shape[-1])
