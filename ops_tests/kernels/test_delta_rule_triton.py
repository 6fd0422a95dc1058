"""Triton chunked delta rule (fp32) against the float64 token-loop oracle: outputs, final state and every
gradient (q, k, v, β, g, initial state), spec §8 metric err_ratio = RMS(ref − x)/RMS(ref) ≤ 1e-5 (or
max|ref − x| ≤ 1e-6). Covers chunk sizes 16/32/64, T not a multiple of the chunk (T < C, T = 1), odd and
unequal K/V, B = H = 2, gates (mild, strong, randomly zeroed, g ≡ 0), β in (0, 2), initial/final states
and varlen. Without a GPU the kernels run in the Triton interpreter (fp32 only, slow: shapes stay small).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by triton_impl

from kernels.delta_rule import chunk_delta_rule, chunk_delta_rule_torch, delta_rule_recurrent  # noqa: E402
from kernels.delta_rule import triton_impl  # noqa: E402
from kernels.delta_rule.triton_impl import chunk_delta_rule_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL, ATOL = 1e-5, 1e-6


def _inputs(B: int, T: int, H: int, K: int, V: int, *, gate: str | None, n_states: int, seed: int) -> dict:
    """float64 inputs: unit-norm keys, β in (0, 2) (negative eigenvalues), random initial state."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
         "beta": 2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "initial_state": r(n_states, H, K, V)}
    u = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if gate == "mild":
        x["g"] = -0.5 * u
    elif gate == "strong":  # up to e^-4 per token, a third of the tokens not decaying at all
        x["g"] = -4 * u * (torch.rand(B, T, H, generator=gen, dtype=torch.float64) > 0.33)
    elif gate == "zero":
        x["g"] = torch.zeros(B, T, H, dtype=torch.float64)
    return x


def _run(fn, x: dict, dtype: torch.dtype, *, with_state: bool, seed: int, **kw) -> dict:  # noqa: ANN001
    """Forward, then backward of (o·dO).sum() + (S_T·dS_T).sum() with random dO, dS_T; returns o, S_T, grads."""
    leaves = {n: t.detach().to(DEVICE, dtype).clone().requires_grad_() for n, t in x.items()}
    if not with_state:
        leaves.pop("initial_state")
    o, s = fn(**leaves, output_final_state=with_state, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
    if with_state:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)).sum()
    loss.backward()
    out = {"o": o, **({"final_state": s} if with_state else {})}
    return {**out, **{"d" + n: t.grad for n, t in leaves.items()}}


def _check(got: dict, ref: dict, tol: dict | None = None) -> None:
    """Spec §8 metric for every output and gradient; `tol` overrides TOL per name."""
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        x = got[name].detach().to("cpu", torch.float64)
        r = r.detach().to("cpu", torch.float64)
        assert x.shape == r.shape and torch.isfinite(x).all(), name
        if (r - x).abs().max() <= ATOL:
            continue
        ratio = ((r - x).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item()
        if os.environ.get("DELTA_RULE_PRINT_ERR"):
            print(f"{name}: {ratio:.1e}")
        assert ratio <= (tol or {}).get(name, TOL), f"{name}: err_ratio {ratio:.2e}"


def _compare(B: int, T: int, H: int, K: int, V: int, C: int, *, gate: str | None, with_state: bool = True,
             cu_seqlens: list[int] | None = None, scale: float | None = None, seed: int = 0) -> None:
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    x = _inputs(B, T, H, K, V, gate=gate, n_states=B if cu is None else len(cu) - 1, seed=seed)
    ref = _run(delta_rule_recurrent, x, torch.float64, with_state=with_state, seed=seed, cu_seqlens=cu, scale=scale)
    got = _run(chunk_delta_rule_triton, x, torch.float32, with_state=with_state, seed=seed,
               cu_seqlens=None if cu is None else cu.to(DEVICE), chunk_size=C, scale=scale)
    assert got["o"].dtype == torch.float32 and (not with_state or got["final_state"].dtype == torch.float32)
    _check(got, ref)


@pytest.mark.parametrize("B,T,H,K,V,C,gate", [
    (2, 37, 2, 20, 12, 16, "mild"),  # B = H = 2, odd K ≠ V, 3 chunks (last one partial)
    (2, 37, 2, 20, 12, 16, None),
    (1, 100, 1, 16, 32, 32, "mild"),  # K < V, 4 chunks, last one partial
    (1, 70, 1, 24, 20, 64, "strong"),  # two chunks of 64, the second 6 rows; γ spans > 88 (e^γ underflows)
    (1, 64, 1, 16, 16, 64, None),  # exactly one full chunk of 64
    (1, 10, 1, 20, 12, 32, "strong"),  # T < C
    (1, 1, 2, 20, 12, 16, "mild"),  # T = 1
])
def test_matches_float64_oracle(B, T, H, K, V, C, gate):
    _compare(B, T, H, K, V, C, gate=gate)


def test_several_v_tiles_and_custom_scale(monkeypatch):
    """V = 40 in tiles of 16 (the last one partial): every V loop and V grid axis runs more than once."""
    monkeypatch.setattr(triton_impl, "MAX_BV", 16)
    _compare(1, 24, 1, 20, 40, 16, gate="mild", scale=0.1, seed=9)


@pytest.mark.parametrize("gate", [None, "mild"])
def test_without_initial_or_final_state(gate):
    """No h0 (the state starts at zero, no dh0) and no final state (dS_T = None in the backward)."""
    _compare(1, 40, 1, 16, 16, 16, gate=gate, with_state=False, seed=5)


@pytest.mark.parametrize("gate", [None, "strong"])
def test_varlen_matches_oracle(gate):
    """Varlen: length-1 sequences, one shorter than the chunk, one spanning 3 chunks; state restarts."""
    cu = [0, 1, 20, 21, 27, 60]
    _compare(1, 60, 2, 20, 12, 16, gate=gate, cu_seqlens=cu, seed=11)


@pytest.mark.parametrize("gate", [None, "mild"])
def test_fp16_within_spec_tolerances(gate):
    """fp16 inputs (input-dtype Ai, W, U, S_c, v_new; fp32 accumulators): spec §8 fp16 GDN tolerances.
    Checks the dtype plumbing the fp32 tests cannot see; outputs and grads in fp16, final state fp32."""
    x = _inputs(1, 40, 2, 20, 12, gate=gate, n_states=1, seed=4)
    ref = _run(delta_rule_recurrent, x, torch.float64, with_state=True, seed=4)
    got = _run(chunk_delta_rule_triton, x, torch.float16, with_state=True, seed=4, chunk_size=16)
    assert got["o"].dtype == got["dk"].dtype == torch.float16 and got["final_state"].dtype == torch.float32
    _check(got, ref, {"o": 5e-3, "final_state": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3,
                      "dinitial_state": 8e-3, "dbeta": 2e-2, "dg": 2e-2})


def test_zero_gate_equals_plain_deltanet():
    x = _inputs(1, 45, 1, 16, 16, gate="zero", n_states=1, seed=3)
    gated = _run(chunk_delta_rule_triton, x, torch.float32, with_state=True, seed=3, chunk_size=32)
    x.pop("g")
    plain = _run(chunk_delta_rule_triton, x, torch.float32, with_state=True, seed=3, chunk_size=32)
    assert gated.pop("dg").abs().sum() > 0  # g ≡ 0 still has a gradient
    _check(gated, plain)


def test_matches_torch_chunked_fp32():
    """A moderately sized case against the pure-torch chunked path (autograd through torch ops), both fp32."""
    x = _inputs(2, 96, 2, 32, 32, gate="mild", n_states=2, seed=21)
    ref = _run(chunk_delta_rule_torch, x, torch.float32, with_state=True, seed=21, chunk_size=32)
    got = _run(chunk_delta_rule_triton, x, torch.float32, with_state=True, seed=21, chunk_size=32)
    _check(got, ref)


def test_dispatcher_routes_to_triton(monkeypatch):
    x = {n: t.float().to(DEVICE) for n, t in _inputs(1, 20, 1, 16, 16, gate="mild", n_states=1, seed=2).items()}
    calls = []

    def spy(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(kw)
        return chunk_delta_rule_triton(*args, **kw)

    monkeypatch.setattr(triton_impl, "chunk_delta_rule_triton", spy)
    o, s = chunk_delta_rule(**x, output_final_state=True, chunk_size=16, backend="triton")
    assert len(calls) == 1 and calls[0]["chunk_size"] == 16
    o_ref, s_ref = chunk_delta_rule_triton(**x, output_final_state=True, chunk_size=16)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_rejects_unsupported_inputs():
    x = _inputs(1, 4, 1, 16, 16, gate=None, n_states=1, seed=0)
    with pytest.raises(TypeError):
        chunk_delta_rule_triton(**x)  # float64 belongs to the torch path
    x = {n: t.float() for n, t in _inputs(1, 4, 1, 257, 16, gate=None, n_states=1, seed=0).items()}
    with pytest.raises(ValueError):
        chunk_delta_rule_triton(**x)
