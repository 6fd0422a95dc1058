"""Triton kernels of the dropless MoE dispatch (spec moeut.md §3.2): gather, grouped matmul, scatter.

Padded-row kernels run one program per BM-row tile b of the padded buffer (BM = plan.block); the tile's
expert is tile_expert[b] (−1 past the last expert). Row r of expert e holds sorted entry
entry_off[e] + (r − padded_offsets[e]) while r − padded_offsets[e] < counts[e], else it is padding.
Each padded-row kernel writes every row of its tile (padding rows and dead tiles get zeros), so outputs
can be allocated with torch.empty. Per-output-row kernels (gather backward, scatter forward) sum over the
fan in a fixed j = 0..fan−1 order in fp32. No atomics anywhere: every output element has one writer.
Matmuls: fp32 accumulation, IEEE (no TF32). Row offsets are int64 (padded buffers can be large).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_rows(b, tile_expert, padded_offsets, counts, BM: tl.constexpr):
    """(rows int64 [BM], expert (clamped ≥ 0), tile is live, local row index [BM], row holds an entry [BM])."""
    e = tl.load(tile_expert + b)
    live = e >= 0
    e = tl.maximum(e, 0)
    cnt = tl.where(live, tl.load(counts + e), 0)
    rows = b.to(tl.int64) * BM + tl.arange(0, BM)
    local = rows - tl.load(padded_offsets + e)
    return rows, e, live, local, local < cnt


@triton.jit
def gather_kernel(x, xs, src, tile_expert, padded_offsets, counts, entry_off, D,
                  BM: tl.constexpr, BD: tl.constexpr):
    """xs[row] = x[src[entry(row)]], zero on padding rows. Grid (n_tiles, cdiv(D, BD))."""
    rows, e, _, local, valid = tile_rows(tl.program_id(0), tile_expert, padded_offsets, counts, BM)
    s = tl.load(src + tl.load(entry_off + e) + local, mask=valid, other=0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cm = (cols < D)[None, :]
    v = tl.load(x + s[:, None] * D + cols[None, :], mask=valid[:, None] & cm, other=0.)
    tl.store(xs + rows[:, None] * D + cols[None, :], v, mask=cm)


@triton.jit
def fan_sum_kernel(buf, out, slot_row, gates, N, D, FAN, GATED: tl.constexpr, BR: tl.constexpr,
                   BD: tl.constexpr):
    """out[o] = Σ_{j<FAN} (gates[o·FAN+j] ·) buf[slot_row[o·FAN+j]], j in order, fp32 sum.

    Gather backward (GATED False: dx from dxs) and scatter forward (GATED: y from ys). The gate is
    rounded to buf's dtype first, as the torch path does. Grid (cdiv(N, BR), cdiv(D, BD))."""
    o = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    om = o < N
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    m = om[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for j in range(0, FAN):
        f = o * FAN + j
        row = tl.load(slot_row + f, mask=om, other=0)
        v = tl.load(buf + row[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
        if GATED:
            g = tl.load(gates + f, mask=om, other=0.).to(buf.dtype.element_ty).to(tl.float32)
            v = v * g[:, None]
        acc += v
    tl.store(out + o[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def scatter_bwd_kernel(ys, dy, gates, order, dys, dgates, tile_expert, padded_offsets, counts, entry_off,
                       D, FAN, WANT_DYS: tl.constexpr, WANT_DGATES: tl.constexpr, BM: tl.constexpr,
                       BD: tl.constexpr):
    """For the slot f = order[entry(row)]: dys[row] = gates[f]·dy[f // FAN] (zero on padding rows) and
    dgates[f] = <ys[row], dy[f // FAN]> (fp32, d tiles in order). Grid (n_tiles,): every slot has exactly
    one row, so each dgates entry has one writer."""
    rows, e, _, local, valid = tile_rows(tl.program_id(0), tile_expert, padded_offsets, counts, BM)
    f = tl.load(order + tl.load(entry_off + e) + local, mask=valid, other=0)
    o = f // FAN
    g = tl.load(gates + f, mask=valid, other=0.).to(dy.dtype.element_ty).to(tl.float32)
    dot = tl.zeros([BM], dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cm = (cols < D)[None, :]
        m = valid[:, None] & cm
        dyv = tl.load(dy + o[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
        if WANT_DYS:
            tl.store(dys + rows[:, None] * D + cols[None, :], (g[:, None] * dyv).to(dys.dtype.element_ty), mask=cm)
        if WANT_DGATES:
            yv = tl.load(ys + rows[:, None] * D + cols[None, :], mask=m, other=0.).to(tl.float32)
            dot += tl.sum(yv * dyv, 1)
    if WANT_DGATES:
        tl.store(dgates + f, dot.to(dgates.dtype.element_ty), mask=valid)


@triton.jit
def grouped_mm_kernel(a, w, c, tile_expert, padded_offsets, counts, K, N, stride_we, stride_wk, stride_wn,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c[rows] = a[rows] @ W[e] for the rows of tile b (a [P, K], c [P, N] contiguous; W[e] read through
    strides, so the backward passes Wᵀ by swapping them). Padding rows and dead tiles store zeros (a dead
    tile runs no K step). Grid (n_tiles, cdiv(N, BN))."""
    rows, e, live, _, valid = tile_rows(tl.program_id(0), tile_expert, padded_offsets, counts, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cm = cols < N
    ks = tl.arange(0, BK)
    wp = w + e.to(tl.int64) * stride_we
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    n_k = tl.where(live, tl.cdiv(K, BK), 0)
    for kt in range(0, n_k):
        k = kt * BK + ks
        km = k < K
        av = tl.load(a + rows[:, None] * K + k[None, :], mask=valid[:, None] & km[None, :], other=0.)
        wv = tl.load(wp + k[:, None] * stride_wk + cols[None, :] * stride_wn, mask=km[:, None] & cm[None, :],
                     other=0.)
        acc = tl.dot(av, wv.to(av.dtype), acc, input_precision="ieee")
    tl.store(c + rows[:, None] * N + cols[None, :], acc.to(c.dtype.element_ty), mask=cm[None, :])


@triton.jit
def grouped_mm_dw_kernel(a, g, dw, padded_offsets, counts, K, N, BM: tl.constexpr, BK: tl.constexpr,
                         BN: tl.constexpr):
    """dW[e][k-tile, n-tile] = a_eᵀ g_e over expert e's rows, BM rows per step in order (no split-K);
    rows past counts[e] are masked (an expert without rows stores zeros). a [P, K], g [P, N], dw [E, K, N]
    contiguous. Grid (E, cdiv(K, BK), cdiv(N, BN))."""
    e = tl.program_id(0)
    start = tl.load(padded_offsets + e).to(tl.int32)
    end = start + tl.load(counts + e).to(tl.int32)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    km = ks < K
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    cm = cols < N
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        rm = rows < end
        at = tl.load(a + rows[None, :] * K + ks[:, None], mask=km[:, None] & rm[None, :], other=0.)
        gv = tl.load(g + rows[:, None] * N + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.)
        acc = tl.dot(at, gv.to(at.dtype), acc, input_precision="ieee")
    out = dw + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    tl.store(out, acc.to(dw.dtype.element_ty), mask=km[:, None] & cm[None, :])
