"""Chunked delta rule (pure torch) equals the token-by-token oracle in float64 (spec: ≤ 1e-10), across
chunk sizes, lengths that are not a multiple of the chunk, odd head dims, β in (0, 2), gates,
initial / final states and varlen batches (length-1 sequences included); gradients too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.delta_rule import chunk_delta_rule_torch, delta_rule_recurrent

TOL = 1e-10


def _inputs(B: int, T: int, H: int, K: int, V: int, *, gated: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"q": r(B, T, H, K), "k": F.normalize(r(B, T, H, K), dim=-1), "v": r(B, T, H, V),
         "beta": 2 * torch.rand(B, T, H, generator=g, dtype=torch.float64)}  # β in (0, 2): negative eigenvalues
    if gated:
        x["g"] = -torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 37, 64, 100])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_equals_token_loop(chunk, T, gated):
    B, H, K, V = 2, 3, 7, 5  # odd head dims
    x = _inputs(B, T, H, K, V, gated=gated)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    ref, ref_s = delta_rule_recurrent(**x, initial_state=h0, output_final_state=True)
    out, s = chunk_delta_rule_torch(**x, initial_state=h0, output_final_state=True, chunk_size=chunk)
    assert _rel(out, ref) <= TOL and _rel(s, ref_s) <= TOL


def test_zero_gate_is_plain_deltanet():
    x = _inputs(1, 50, 2, 8, 8, gated=False)
    plain, _ = chunk_delta_rule_torch(**x, chunk_size=16)
    gated, _ = chunk_delta_rule_torch(**x, g=torch.zeros_like(x["beta"]), chunk_size=16)
    assert _rel(gated, plain) <= TOL


@pytest.mark.parametrize("gated", [False, True])
def test_varlen_restarts_the_state_at_each_boundary(gated):
    lengths = [1, 20, 1, 45, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    H, K, V = 2, 6, 4
    x = _inputs(1, int(cu[-1]), H, K, V, gated=gated, seed=3)
    h0 = torch.randn(len(lengths), H, K, V, dtype=torch.float64)
    out, s = chunk_delta_rule_torch(**x, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    ref, ref_s = delta_rule_recurrent(**x, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert _rel(out, ref) <= TOL and _rel(s, ref_s) <= TOL
    # each sequence alone gives its slice: the state really restarts
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = {k: t[:, a:b] for k, t in x.items()}
        alone, _ = delta_rule_recurrent(**one, initial_state=h0[n:n + 1])
        assert _rel(out[:, a:b], alone) <= TOL


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_match_the_oracle(gated):
    x = _inputs(1, 41, 2, 5, 3, gated=gated, seed=7)
    h0 = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    weights = torch.randn(1, 41, 2, 3, dtype=torch.float64)
    sw = torch.randn(1, 2, 5, 3, dtype=torch.float64)

    def grads(fn, **kw):  # noqa: ANN001, ANN202
        leaves = {k: t.clone().requires_grad_() for k, t in {**x, "initial_state": h0}.items()}
        o, s = fn(**leaves, output_final_state=True, **kw)
        ((o * weights).sum() + (s * sw).sum()).backward()
        return {k: t.grad for k, t in leaves.items()}

    ref = grads(delta_rule_recurrent)
    got = grads(chunk_delta_rule_torch, chunk_size=16)
    for name in ref:
        assert _rel(got[name], ref[name]) <= 1e-9, name
