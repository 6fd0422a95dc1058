"""Triton path of the chunked delta rule: the autograd Function and the host-side chunk bookkeeping.

Same contract as `torch_impl.chunk_delta_rule_torch`. The forward saves only q, k, v, β, g, Ai and the
initial state; the backward recomputes W, U, the per-chunk states and v_new with the forward kernels
(spec §2 "Backward"), then runs its own kernels (triton_bwd) — no autograd through torch ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kernels.delta_rule import triton_bwd as bwd
from kernels.delta_rule import triton_fwd as fwd

MAX_K = 256  # K is held as one tile per program
MAX_BV = 64  # widest V tile; tests lower it to exercise several (and partial) V tiles on small shapes


@dataclass(frozen=True)
class _Chunks:
    """Chunk grid of a flat token stream; computed once per call on the host, reused by the backward."""
    cu: torch.Tensor  # [N+1] int32, sequence bounds in the flat stream
    offsets: torch.Tensor  # [N+1] int32, first global chunk index of each sequence
    info: torch.Tensor  # [NC, 2] int32, (first token, valid rows) per chunk
    n_chunks: int
    C: int


def _chunk_grid(cu_seqlens: torch.Tensor | None, B: int, T: int, C: int, device: torch.device) -> _Chunks:
    """(sequence, chunk) bookkeeping; a plain batch is B sequences of length T in the flat stream."""
    if cu_seqlens is None:
        cu = torch.arange(B + 1, dtype=torch.int64) * T
    else:  # one device -> host copy per call; the chunk grid is needed on the host for the launch grids
        cu = cu_seqlens.detach().to("cpu", torch.int64)
    lens = cu[1:] - cu[:-1]
    per_seq = (lens + C - 1) // C
    offsets = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)])
    n_chunks = int(offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(lens)), per_seq)
    start = cu[seq] + (torch.arange(n_chunks) - offsets[seq]) * C
    info = torch.stack([start, torch.minimum(cu[seq + 1] - start, torch.tensor(C))], 1)
    as_dev = lambda x: x.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
    return _Chunks(as_dev(cu), as_dev(offsets), as_dev(info), n_chunks, C)


def _launch(K: int) -> dict:
    """One fixed config (no autotuning yet). num_stages=1: the V loops are short and pipelining their loads
    raised the shared memory of dqkw to 128-176 KB at K=128 on sm_90; with 1 stage every kernel stays
    ≤ 106 KB up to K=256 (measured by compiling for sm_90, not yet timed on a GPU)."""
    return dict(num_warps=4 if K <= 128 else 8, num_stages=1)


def _blocks(K: int, V: int) -> tuple[int, int]:
    """Power-of-two tiles ≥ 16 (tl.dot's minimum); the state tile BK×BV stays ≤ 8K fp32 elements."""
    BK = max(16, triton.next_power_of_2(K))
    return BK, max(16, min(triton.next_power_of_2(V), MAX_BV if BK <= 128 else min(MAX_BV, 32)))


def _recompute_states(q, k, v, beta, g, ai, h0, ch: _Chunks, want_final: bool):  # noqa: ANN001, ANN202
    """W, U, S_c per chunk, v_new (and the final state): shared by forward and backward."""
    _, _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _blocks(K, V)
    N = ch.cu.numel() - 1
    gated, gp = g is not None, (g if g is not None else beta)
    w, u = torch.empty_like(k), torch.empty_like(v)
    fwd.wu_kernel[(ch.n_chunks, H)](k, v, beta, gp, ai, w, u, ch.info, H, K, V, ch.C, BK, BV, gated, **_launch(K))
    states = k.new_empty(ch.n_chunks, H, K, V)
    vnew = torch.empty_like(v)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if want_final else states
    fwd.state_scan_kernel[(N, H, triton.cdiv(V, BV))](
        k, w, u, gp, h0 if h0 is not None else states, states, vnew, ht, ch.cu, ch.offsets, H, K, V, ch.C, BK, BV,
        gated, h0 is not None, want_final, **_launch(K))
    return w, states, vnew, (ht if want_final else None)


class _ChunkDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, ch: _Chunks, scale: float):  # noqa: ANN001, ANN205
        ctx.set_materialize_grads(False)  # dS_T is None when the caller drops the final state
        _, _, H, K = k.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        gated, gp = g is not None, (g if g is not None else beta)
        ai = k.new_empty(*k.shape[:3], ch.C)
        fwd.kkt_solve_kernel[(ch.n_chunks, H)](k, beta, gp, ai, ch.info, H, K, ch.C, BK, gated, **_launch(K))
        _, states, vnew, ht = _recompute_states(q, k, v, beta, g, ai, h0, ch, want_final=True)
        o = torch.empty_like(v)
        fwd.output_kernel[(ch.n_chunks, H, triton.cdiv(V, BV))](
            q, k, gp, states, vnew, o, ch.info, scale, H, K, V, ch.C, BK, BV, gated, **_launch(K))
        ctx.save_for_backward(q, k, v, beta, g, ai, h0)
        ctx.ch, ctx.scale = ch, scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):  # noqa: ANN001, ANN205
        q, k, v, beta, g, ai, h0 = ctx.saved_tensors
        ch, scale = ctx.ch, ctx.scale
        _, _, H, K = k.shape
        V = v.shape[-1]
        N = ch.cu.numel() - 1
        BK, BV = _blocks(K, V)
        gated, gp = g is not None, (g if g is not None else beta)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        w, states, vnew, _ = _recompute_states(q, k, v, beta, g, ai, h0, ch, want_final=False)
        f32 = dict(dtype=torch.float32)
        dvl = v.new_empty(v.shape, **f32)
        bwd.dv_local_kernel[(ch.n_chunks, H, triton.cdiv(V, BV))](
            q, k, gp, do, dvl, ch.info, scale, H, K, V, ch.C, BK, BV, gated, **_launch(K))
        dstates = k.new_empty(ch.n_chunks, H, K, V, **f32)
        dv2 = torch.empty_like(dvl)
        dh0 = k.new_empty(N, H, K, V, **f32) if h0 is not None else dstates
        bwd.state_grad_scan_kernel[(N, H, triton.cdiv(V, BV))](
            q, k, w, gp, do, dvl, dht.contiguous() if dht is not None else dstates, dstates, dv2, dh0, ch.cu,
            ch.offsets, scale, H, K, V, ch.C, BK, BV, gated, dht is not None, h0 is not None, **_launch(K))
        dq, dk, dw = (k.new_empty(k.shape, **f32) for _ in range(3))
        dgam = beta.new_empty(beta.shape, **f32) if gated else dq
        bwd.dqkw_kernel[(ch.n_chunks, H)](
            q, k, gp, states, vnew, dstates, dv2, do, dq, dk, dw, dgam, ch.info, scale, H, K, V, ch.C, BK, BV, gated,
            **_launch(K))
        dv = torch.empty_like(dvl)
        dbeta = beta.new_empty(beta.shape, **f32)
        dg = torch.empty_like(dbeta) if gated else dbeta
        bwd.wy_bwd_kernel[(ch.n_chunks, H)](
            k, v, beta, gp, ai, dv2, dw, dk, dv, dbeta, dgam, dg, ch.info, H, K, V, ch.C, BK, BV, gated, **_launch(K))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype),
                dg.to(g.dtype) if gated else None, dh0.to(h0.dtype) if h0 is not None else None, None, None)


@torch.compiler.disable  # spec §7: no torch.compile tracing through the autograd Function
def chunk_delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                            g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                            output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                            chunk_size: int = 64,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton chunked delta rule: same contract as `chunk_delta_rule_torch` (fp32/fp16/bf16 inputs).

    o comes back in q's dtype, the final state in fp32. K ≤ 256; V any.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Triton delta rule runs fp32/fp16/bf16, got {q.dtype} (use the torch backend)")
    if K > MAX_K:
        raise ValueError(f"Triton delta rule supports K ≤ {MAX_K}, got {K}")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"chunk_size={chunk_size}; allowed: 16, 32, 64")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"varlen (cu_seqlens) needs batch size 1, got {B}")
    scale = K ** -0.5 if scale is None else float(scale)
    ch = _chunk_grid(cu_seqlens, B, T, chunk_size, q.device)
    N = ch.cu.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"initial_state must be {(N, H, K, V)}, got {tuple(initial_state.shape)}")
    if ch.n_chunks == 0:  # no tokens: nothing to launch
        o = v.new_zeros(B, T, H, V).to(q.dtype)
        hT = initial_state.float() if initial_state is not None else q.new_zeros(N, H, K, V, dtype=torch.float32)
        return o, (hT if output_final_state else None)
    q, k, v = (x.to(q.dtype).contiguous() for x in (q, k, v))
    o, ht = _ChunkDeltaRule.apply(q, k, v, beta.contiguous(), None if g is None else g.contiguous(),
                                  None if initial_state is None else initial_state.contiguous(), ch, scale)
    return o, (ht if output_final_state else None)
