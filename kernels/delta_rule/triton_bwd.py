"""Backward Triton kernels of the chunked delta rule (spec §2 "Backward", §3): dv_local, reverse
state-gradient scan, dq/dk/dw, WY backward with dβ and dg.

Per chunk, with Γ_ij = exp(γ_i − γ_j), Kβg = β ⊙ K ⊙ e^γ, D_c = dL/dS at chunk end:
  O = scale((Q ⊙ e^γ) S_c + (QKᵀ ⊙ Γ ⊙ causal) v_new);  S_{c+1} = e^{γ_L} S_c + (K ⊙ e^{γ_L−γ})ᵀ v_new;
  v_new = U − W S_c;  W = Ai Kβg;  U = Ai (β ⊙ V);  Ai = (I + A)⁻¹.
dγ collects every place γ appears (q-side decay, Γ, the state update, W, A); dg is its reverse
chunk-local cumsum because γ_i = Σ_{t≤i} g_t. Same layout and precision rules as triton_fwd.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.delta_rule.triton_fwd import chunk_bounds, chunk_gamma, decay, mm, rows, state_tile, tokens


@triton.jit
def dv_local_kernel(q, k, g, do, dvl, info, scale, H, K, V, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, GATED: tl.constexpr):
    """dv_local_j = scale Σ_{i≥j} (k_j·q_i) Γ_ij dO_i: the gradient of v_new through this chunk's outputs."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    DT: tl.constexpr = q.dtype.element_ty
    tok0, length = chunk_bounds(info, c)
    koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
    qt = tl.load(q + koffs, mask=kmask, other=0.)
    kt = tl.load(k + koffs, mask=kmask, other=0.)
    gam, _ = chunk_gamma(g, tok0, length, h, H, C, GATED)
    kq = mm(kt, tl.trans(qt), DT) * tl.trans(decay(gam, 0, C))  # [j, i], kept where i ≥ j
    voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
    dot = tl.load(do + voffs, mask=vmask, other=0.)
    tl.store(dvl + voffs, scale * mm(kq, dot, DT), mask=vmask)


@triton.jit
def state_grad_scan_kernel(q, k, w, g, do, dvl, dht, dstates, dv2, dh0, cu, coff, scale, H, K, V,
                           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                           HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    """Reverse scan over the chunks of one sequence; grid (sequence, head, V tile).

    Stores D_c (gradient at chunk end) and dv2 = dv_local + (K ⊙ e^{γ_L−γ}) D_c (= dL/dv_new), then
    D ← e^{γ_L} D + scale (Q ⊙ e^γ)ᵀ dO − Wᵀ dv2. After the first chunk D = dL/dS_0.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    DT: tl.constexpr = q.dtype.element_ty
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    nch = tl.cdiv(eos - bos, C)
    soffs, smask = state_tile(n * H + h, K, V, v0, BK, BV)
    D = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        D = tl.load(dht + soffs, mask=smask, other=0.).to(tl.float32)
    for j in range(0, nch):
        ic = nch - 1 - j
        tok0 = bos + ic * C
        length = tl.minimum(eos - tok0, C).to(tl.int32)
        coffs, cmask = state_tile((c0 + ic) * H + h, K, V, v0, BK, BV)
        tl.store(dstates + coffs, D, mask=cmask)
        gam, glast = chunk_gamma(g, tok0, length, h, H, C, GATED)
        koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
        voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
        kd = tl.load(k + koffs, mask=kmask, other=0.).to(tl.float32) * tl.exp(glast - gam)[:, None]
        d2 = tl.load(dvl + voffs, mask=vmask, other=0.) + mm(kd, D, DT)
        tl.store(dv2 + voffs, d2, mask=vmask)
        qg = tl.load(q + koffs, mask=kmask, other=0.).to(tl.float32) * (scale * tl.exp(gam))[:, None]
        wt = tl.load(w + koffs, mask=kmask, other=0.)
        dot = tl.load(do + voffs, mask=vmask, other=0.)
        D = D * tl.exp(glast) + mm(tl.trans(qg), dot, DT) - mm(tl.trans(wt), d2, DT)
    if STORE_DH0:
        tl.store(dh0 + soffs, D, mask=smask)


@triton.jit
def dqkw_kernel(q, k, g, states, vnew, dstates, dv2, do, dq, dk, dw, dgam, info, scale, H, K, V,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr):
    """dQ, dK through outputs and state update, dW = −dv2 S_cᵀ, and their share of dγ; grid (chunk, head).

    dγ_i gets Σ(dq⊙q)_i − Σ(dk⊙k)_i (every factor e^{±γ} of those terms sits next to q_i or k_i), and
    γ_L also gets Σ_j (dK_state ⊙ K)_j + e^{γ_L} Σ(S_c ⊙ D_c) from the state update.
    """
    c = tl.program_id(0)
    h = tl.program_id(1)
    DT: tl.constexpr = q.dtype.element_ty
    tok0, length = chunk_bounds(info, c)
    koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
    qt = tl.load(q + koffs, mask=kmask, other=0.).to(tl.float32)
    kt = tl.load(k + koffs, mask=kmask, other=0.).to(tl.float32)
    dq_s = tl.zeros([C, BK], dtype=tl.float32)  # dO S_cᵀ
    dk_s = tl.zeros([C, BK], dtype=tl.float32)  # v_new D_cᵀ
    dwt = tl.zeros([C, BK], dtype=tl.float32)
    dp = tl.zeros([C, C], dtype=tl.float32)  # dO v_newᵀ
    sd = tl.zeros([BK, BV], dtype=tl.float32)  # Σ over V tiles of S_c ⊙ D_c, reduced after the loop
    for v0 in range(0, V, BV):
        soffs, smask = state_tile(c * H + h, K, V, v0, BK, BV)
        S = tl.load(states + soffs, mask=smask, other=0.)
        D = tl.load(dstates + soffs, mask=smask, other=0.)
        voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
        vn = tl.load(vnew + voffs, mask=vmask, other=0.)
        d2 = tl.load(dv2 + voffs, mask=vmask, other=0.)
        dot = tl.load(do + voffs, mask=vmask, other=0.)
        dq_s += mm(dot, tl.trans(S), DT)
        dk_s += mm(vn, tl.trans(D), DT)
        dwt -= mm(d2, tl.trans(S), DT)
        dp += mm(dot, tl.trans(vn), DT)
        sd += S.to(tl.float32) * D
    gam, glast = chunk_gamma(g, tok0, length, h, H, C, GATED)
    dm = scale * dp * decay(gam, 0, C)
    dqt = dq_s * (scale * tl.exp(gam))[:, None] + mm(dm, kt, DT)
    dk_s = dk_s * tl.exp(glast - gam)[:, None]
    dkt = mm(tl.trans(dm), qt, DT) + dk_s
    tl.store(dq + koffs, dqt, mask=kmask)
    tl.store(dk + koffs, dkt, mask=kmask)
    tl.store(dw + koffs, dwt, mask=kmask)
    if GATED:
        r = tl.arange(0, C)
        last = tl.sum(tl.sum(dk_s * kt, 1), 0) + tl.exp(glast) * tl.sum(tl.sum(sd, 1), 0)
        dg_ = tl.sum(dqt * qt, 1) - tl.sum(dkt * kt, 1) + tl.where(r == length - 1, last, 0.)
        toffs, tmask = tokens(tok0, length, h, H, C)
        tl.store(dgam + toffs, dg_, mask=tmask)


@triton.jit
def wy_bwd_kernel(k, v, beta, g, ai, dv2, dw, dk, dv, dbeta, dgam, dg, info, H, K, V, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr):
    """Through W = Ai Kβg, U = Ai(β⊙V) and Ai = (I + A)⁻¹ (dA = −Aiᵀ dAi Aiᵀ, strictly lower) to dk, dv, dβ;
    finishes dγ and writes dg = reverse chunk-local cumsum of dγ. Grid (chunk, head); dk is accumulated."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    DT: tl.constexpr = k.dtype.element_ty
    tok0, length = chunk_bounds(info, c)
    r = tl.arange(0, C)
    inv = tl.load(ai + ((tok0 + r)[:, None] * H + h) * C + r[None, :], mask=(r < length)[:, None],
                  other=0.).to(tl.float32)
    toffs, tmask = tokens(tok0, length, h, H, C)
    b = tl.load(beta + toffs, mask=tmask, other=0.).to(tl.float32)
    gam, _ = chunk_gamma(g, tok0, length, h, H, C, GATED)
    eg = tl.exp(gam)
    koffs, kmask = rows(tok0, length, h, H, K, 0, C, BK)
    kt = tl.load(k + koffs, mask=kmask, other=0.).to(tl.float32)
    kbg = kt * (b * eg)[:, None]
    dwt = tl.load(dw + koffs, mask=kmask, other=0.)
    dkbg = mm(tl.trans(inv), dwt, DT)  # dL/dKβg
    dai = mm(dwt, tl.trans(kbg), DT)
    db = tl.sum(dkbg * kt, 1) * eg
    dgm = tl.sum(dkbg * kbg, 1)
    for v0 in range(0, V, BV):
        voffs, vmask = rows(tok0, length, h, H, V, v0, C, BV)
        du = tl.load(dv2 + voffs, mask=vmask, other=0.)
        vt = tl.load(v + voffs, mask=vmask, other=0.).to(tl.float32)
        dai += mm(du, tl.trans(vt * b[:, None]), DT)
        dvb = mm(tl.trans(inv), du, DT)  # dL/d(β⊙V)
        tl.store(dv + voffs, dvb * b[:, None], mask=vmask)
        db += tl.sum(dvb * vt, 1)
    strict = r[:, None] > r[None, :]
    da = -mm(mm(tl.trans(inv), tl.where(strict, dai, 0.), tl.float32), tl.trans(inv), tl.float32)
    da = tl.where(strict, da, 0.) * decay(gam, 1, C)  # dL/d(β_i k_i·k_j)
    kk = mm(kt, tl.trans(kt), tl.float32)
    db += tl.sum(da * kk, 1)
    dab = da * b[:, None]  # dL/d(k_i·k_j)
    dkt = tl.load(dk + koffs, mask=kmask, other=0.) + dkbg * (b * eg)[:, None]
    dkt += mm(dab, kt, DT) + mm(tl.trans(dab), kt, DT)
    tl.store(dk + koffs, dkt, mask=kmask)
    tl.store(dbeta + toffs, db, mask=tmask)
    if GATED:
        ada = dab * kk  # dA ⊙ A: γ_i enters A_ij with +, γ_j with −
        dgm += tl.load(dgam + toffs, mask=tmask, other=0.) + tl.sum(ada, 1) - tl.sum(ada, 0)
        tl.store(dg + toffs, tl.cumsum(dgm, 0, reverse=True), mask=tmask)
