"""Forward Triton kernels of the chunked delta rule (spec §2, §3): kkt + solve, w/u, state scan, output.

Tokens of all sequences form one flat stream [TT, H, *] (TT = B·T; a batch is B sequences of length T);
a chunk is (first token, length ≤ C), so varlen and padded last chunks are the same case: rows past the
length are masked to zero, which leaves the state untouched. Gates: γ = chunk-local cumsum of g.
Precision: KKᵀ (it feeds the solve), the solve and the C×C-only products in fp32; the other products over
K or V cast operands to the input dtype (fp32 in the tests) and accumulate in fp32. IEEE everywhere: TF32
would break the 1e-5 tolerances.
The full K dimension is one tile (BK = next power of two ≥ K, ≤ 256); V is tiled by BV.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DT: tl.constexpr):
    """a @ b, operands cast to DT, fp32 accumulation, no TF32."""
    return tl.dot(a.to(DT), b.to(DT), input_precision="ieee")


@triton.jit
def chunk_bounds(info, c):
    """(first token as int64, number of valid rows) of chunk c; `info` is [NC, 2] int32 from the host."""
    return tl.load(info + c * 2).to(tl.int64), tl.load(info + c * 2 + 1)


@triton.jit
def rows(tok0, length, h, H, D, d0, C: tl.constexpr, BD: tl.constexpr):
    """Offsets and mask of the [C, BD] tile (rows tok0.., columns d0..) of a [TT, H, D] tensor."""
    r = tl.arange(0, C)
    cols = d0 + tl.arange(0, BD)
    offs = ((tok0 + r)[:, None] * H + h) * D + cols[None, :]
    return offs, (r < length)[:, None] & (cols < D)[None, :]


@triton.jit
def tokens(tok0, length, h, H, C: tl.constexpr):
    """Offsets and mask of the [C] per-token scalars (beta, g) of a [TT, H] tensor."""
    r = tl.arange(0, C)
    return (tok0 + r) * H + h, r < length


@triton.jit
def state_tile(idx, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the [BK, BV] tile (columns v0..) of matrix `idx` in a [*, K, V] tensor."""
    rk = tl.arange(0, BK)
    cv = v0 + tl.arange(0, BV)
    offs = idx.to(tl.int64) * K * V + rk[:, None] * V + cv[None, :]
    return offs, (rk < K)[:, None] & (cv < V)[None, :]


@triton.jit
def chunk_gamma(g, tok0, length, h, H, C: tl.constexpr, GATED: tl.constexpr):
    """γ [C] = chunk-local cumsum of g (fp32) and γ_last; padded rows add 0, so γ_last = γ[C−1] exactly."""
    offs, m = tokens(tok0, length, h, H, C)
    gv = tl.zeros([C], dtype=tl.float32)
    if GATED:
        gv = tl.load(g + offs, mask=m, other=0.).to(tl.float32)
    gam = tl.cumsum(gv, 0)
    return gam, tl.sum(tl.where(tl.arange(0, C) == C - 1, gam, 0.), 0)


@triton.jit
def decay(gam, DIAG: tl.constexpr, C: tl.constexpr):
    """[C, C] exp(γ_i − γ_j) where i ≥ j + DIAG (DIAG 0: causal with diagonal, 1: strictly lower), else 0.

    The exponent is masked before exp: above the diagonal it is positive and could overflow to inf."""
    r = tl.arange(0, C)
    keep = r[:, None] >= r[None, :] + DIAG
    return tl.where(keep, tl.exp(tl.where(keep, gam[:, None] - gam[None, :], 0.)), 0.)


@triton.jit
def merge_blocks(inv, A, S: tl.constexpr, C: tl.constexpr):
    """Inverse on S×S diagonal blocks -> on 2S×2S blocks: X − X L X, L = A on the lower off-diagonal S-blocks."""
    r = tl.arange(0, C)
    low = (r[:, None] // (2 * S) == r[None, :] // (2 * S)) & (r[:, None] // S != r[None, :] // S)
    return inv - mm(mm(inv, tl.where(low, A, 0.), tl.float32), inv, tl.float32)


@triton.jit
def kkt_solve_kernel(k, beta, g, ai, info, H, K, C: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr):
    """Ai = (I + A)⁻¹ with A = tril(diag(β)(KKᵀ ⊙ exp(γ_i − γ_j)), −1); one program per (chunk, head).

    All fp32. (1) Forward substitution inside the 16×16 diagonal blocks, the blocks side by side: step i
    sets row i of every block to e_r − Σ_{j<r} A_rj Ai_j, using only rows already final (no Neumann
    series: its partial sums blow up and cancel for β near 2). (2) Merges 16 → 32 → 64: with X the
    block-diagonal inverse, the lower off-diagonal block is −X₂₂ A₂₁ X₁₁, i.e. X ← X − X L X where L is
    A on those blocks. Done on full C×C tiles with masks (simple; more FLOPs than a per-block kernel).
    """
    c = tl.program_id(0)
    h = tl.program_id(1)
    tok0, length = chunk_bounds(info, c)
    offs, mask = rows(tok0, length, h, H, K, 0, C, BK)
    kt = tl.load(k + offs, mask=mask, other=0.).to(tl.float32)
    toffs, tmask = tokens(tok0, length, h, H, C)
    b = tl.load(beta + toffs, mask=tmask, other=0.).to(tl.float32)
    gam, _ = chunk_gamma(g, tok0, length, h, H, C, GATED)
    A = mm(kt, tl.trans(kt), tl.float32) * b[:, None] * decay(gam, 1, C)
    r = tl.arange(0, C)
    eye = tl.where(r[:, None] == r[None, :], 1., 0.)
    a_diag = tl.where(r[:, None] // 16 == r[None, :] // 16, A, 0.)
    inv = eye
    for i in range(1, 16):
        inv = tl.where((r % 16 == i)[:, None], eye - mm(a_diag, inv, tl.float32), inv)
    if C >= 32:
        inv = merge_blocks(inv, A, 16, C)
    if C >= 64:
        inv = merge_blocks(inv, A, 32, C)
    aoffs = ((tok0 + r)[:, None] * H + h) * C + r[None, :]
    tl.store(ai + aoffs, inv.to(ai.dtype.element_ty), mask=(r < length)[:, None])


@triton.jit
def wu_kernel(k, v, beta, g, ai, w, u, info, H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              GATED: tl.constexpr):
    """W = Ai(β ⊙ K ⊙ exp(γ)), U = Ai(β ⊙ V); one program per (chunk, head). Also the backward's recompute."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    DT: tl.constexpr = k.dtype.element_ty
    tok0, length = chunk_bounds(info, c)
    r = tl.arange(0, C)
    inv = tl.load(ai + ((tok0 + r)[:, None] * H + h) * C + r[None, :], mask=(r < length)[:, None], other=0.)
    toffs, tmask = tokens(tok0, length, h, H, C)
    b = tl.load(beta + toffs, mask=tmask, other=0.).to(tl.float32)
    gam, _ = chunk_gamma(g, tok0, length, h, H, C, GATED)
    offs, mask = rows(tok0, length, h, H, K, 0, C, BK)
    kbg = tl.load(k + offs, mask=mask, other=0.).to(tl.float32) * (b * tl.exp(gam))[:, None]
    tl.store(w + offs, mm(inv, kbg, DT).to(w.dtype.element_ty), mask=mask)
    for v0 in range(0, V, BV):
        voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
        vb = tl.load(v + voffs, mask=vmask, other=0.).to(tl.float32) * b[:, None]
        tl.store(u + voffs, mm(inv, vb, DT).to(u.dtype.element_ty), mask=vmask)


@triton.jit
def state_scan_kernel(k, w, u, g, h0, states, vnew, ht, cu, coff, H, K, V, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """Sequential over the chunks of one sequence; grid (sequence, head, V tile): columns of S are independent.

    Stores S_c (state at chunk start) and v_new = U − W S_c; S_{c+1} = e^{γ_L} S_c + (K ⊙ e^{γ_L−γ})ᵀ v_new.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    DT: tl.constexpr = k.dtype.element_ty
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    soffs, smask = state_tile(n * H + h, K, V, v0, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0 + soffs, mask=smask, other=0.).to(tl.float32)
    for ic in range(0, tl.cdiv(eos - bos, C)):
        tok0 = bos + ic * C
        length = tl.minimum(eos - tok0, C).to(tl.int32)
        coffs, cmask = state_tile((c0 + ic) * H + h, K, V, v0, BK, BV)
        tl.store(states + coffs, S.to(states.dtype.element_ty), mask=cmask)
        koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
        voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
        wt = tl.load(w + koffs, mask=kmask, other=0.)
        vn = tl.load(u + voffs, mask=vmask, other=0.).to(tl.float32) - mm(wt, S, DT)
        tl.store(vnew + voffs, vn.to(vnew.dtype.element_ty), mask=vmask)
        gam, glast = chunk_gamma(g, tok0, length, h, H, C, GATED)
        kd = tl.load(k + koffs, mask=kmask, other=0.).to(tl.float32) * tl.exp(glast - gam)[:, None]
        S = S * tl.exp(glast) + mm(tl.trans(kd), vn, DT)
    if STORE_FINAL:
        tl.store(ht + soffs, S, mask=smask)


@triton.jit
def output_kernel(q, k, g, states, vnew, o, info, scale, H, K, V, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, GATED: tl.constexpr):
    """O = scale((Q ⊙ e^γ) S_c + (QKᵀ ⊙ exp(γ_i − γ_j) ⊙ causal) v_new); grid (chunk, head, V tile)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    DT: tl.constexpr = q.dtype.element_ty
    tok0, length = chunk_bounds(info, c)
    koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
    qt = tl.load(q + koffs, mask=kmask, other=0.)
    kt = tl.load(k + koffs, mask=kmask, other=0.)
    gam, _ = chunk_gamma(g, tok0, length, h, H, C, GATED)
    attn = mm(qt, tl.trans(kt), DT) * decay(gam, 0, C)
    soffs, smask = state_tile(c * H + h, K, V, v0, BK, BV)
    S = tl.load(states + soffs, mask=smask, other=0.)
    voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
    vn = tl.load(vnew + voffs, mask=vmask, other=0.)
    out = mm(qt, S, DT) * tl.exp(gam)[:, None] + mm(attn, vn, DT)
    tl.store(o + voffs, (scale * out).to(o.dtype.element_ty), mask=vmask)
