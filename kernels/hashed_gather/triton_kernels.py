"""Triton kernels of the MemoryFormer weighted gather (spec memoryformer.md §1): forward, ∂w and ∂T.

Layouts, all contiguous: tables / ∂T [R, H] (fp32, fp16 or bf16), idx [N, K] int64, w / ∂w [N, K] fp32,
y / ∂y [N, H] in the tables' dtype. Entry m = n·K + k. Every sum is taken in fp32 in a fixed order and
every output element has one writer: no atomics, so results are bitwise reproducible run to run. The ∂T
kernel reads the sort plan (order, rows, offsets) built by torch_impl.make_gather_plan. Row offsets into
the tables and activations are int64 (R·H and N·H can pass 2^31).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_fwd_kernel(tables, idx, w, y, N, H, K, BN: tl.constexpr, BH: tl.constexpr):
    """y[n, cols] = Σ_k w[n,k] · tables[idx[n,k], cols], k in order. Grid (cdiv(N, BN), cdiv(H, BH))."""
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    nm = n < N
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    m = nm[:, None] & (cols < H)[None, :]
    acc = tl.zeros([BN, BH], dtype=tl.float32)
    for k in range(K):
        r = tl.load(idx + n * K + k, mask=nm, other=0)
        wk = tl.load(w + n * K + k, mask=nm, other=0.)
        v = tl.load(tables + r[:, None] * H + cols[None, :], mask=m, other=0.).to(tl.float32)
        acc += wk[:, None] * v
    tl.store(y + n[:, None] * H + cols[None, :], acc.to(y.dtype.element_ty), mask=m)


@triton.jit
def gather_dw_kernel(tables, idx, dy, dw, M, H, K, BM: tl.constexpr, BH: tl.constexpr):
    """dw[m] = ⟨dy[m // K], tables[idx[m]]⟩ for a block of BM entries, H in BH tiles in order (fp32).

    Consecutive entries share their n, so a block re-reads few ∂y rows. Grid (cdiv(M, BM),)."""
    e = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    em = e < M
    r = tl.load(idx + e, mask=em, other=0)
    n = e // K
    acc = tl.zeros([BM, BH], dtype=tl.float32)
    for h0 in range(0, H, BH):
        cols = h0 + tl.arange(0, BH)
        m = em[:, None] & (cols < H)[None, :]
        t = tl.load(tables + r[:, None] * H + cols[None, :], mask=m, other=0.).to(tl.float32)
        g = tl.load(dy + n[:, None] * H + cols[None, :], mask=m, other=0.).to(tl.float32)
        acc += t * g
    tl.store(dw + e, tl.sum(acc, 1), mask=em)


@triton.jit
def gather_dtable_kernel(dy, w, order, rows, offsets, dtables, H, K, BS: tl.constexpr, BH: tl.constexpr):
    """dtables[rows[u], cols] = Σ_{i in segment u} w[order[i]] · dy[order[i] // K, cols].

    One program per (selected row u, column tile); the segment is read in sorted order BS entries at a
    time into a [BS, BH] fp32 accumulator, reduced once at the end: a fixed order, one writer per
    element. Rows never selected have no program (the caller zero-fills). Grid (U, cdiv(H, BH))."""
    u = tl.program_id(0)
    start = tl.load(offsets + u).to(tl.int32)
    end = tl.load(offsets + u + 1).to(tl.int32)
    r = tl.load(rows + u)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = (cols < H)[None, :]
    acc = tl.zeros([BS, BH], dtype=tl.float32)
    for s0 in range(start, end, BS):
        pos = s0 + tl.arange(0, BS)
        pm = pos < end
        e = tl.load(order + pos, mask=pm, other=0)
        wv = tl.load(w + e, mask=pm, other=0.)
        g = tl.load(dy + (e // K)[:, None] * H + cols[None, :], mask=pm[:, None] & cm, other=0.).to(tl.float32)
        acc += wv[:, None] * g
    out = tl.sum(acc, 0)
    tl.store(dtables + r * H + cols, out.to(dtables.dtype.element_ty), mask=cols < H)
