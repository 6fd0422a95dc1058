"""Triton MoE dispatch primitives (gather, grouped_mm, scatter) against the pure-torch path, fp32: forward
outputs and every input gradient within err_ratio = RMS(ref − x)/RMS(ref) ≤ 1e-5, padding rows of the
padded outputs (xs, ys, dxs, dys) exactly zero. Upstream gradients and the padded inputs of grouped_mm /
scatter are random on the padding rows too (the torch path ignores those rows; so must the kernels).
Covers σ-MoE (fan_in = fan_out = k), an expert without tokens, all tokens on one expert, E = 1, k = E,
block 16/32, SwitchHead V/O fan mappings, several K/N/d tiles, non-contiguous inputs, the composed
expert_mlp against the torch backend and the token-loop oracle, determinism, and fp16. Without a GPU the
kernels run in the Triton interpreter (fp32/fp16 only, slow: shapes stay small).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by triton_impl

from kernels.moe import expert_mix_reference, expert_mlp, make_plan  # noqa: E402
from kernels.moe import torch_impl as tp  # noqa: E402
from kernels.moe import triton_impl as tr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    den = ref.pow(2).mean().sqrt().item()
    num = (ref - x).pow(2).mean().sqrt().item()
    return num / den if den else num


def _check(got: dict, ref: dict, tol: float = TOL) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        x = got[name]
        assert x.shape == r.shape and x.dtype == r.dtype and torch.isfinite(x).all(), name
        e = _err(x, r)
        if os.environ.get("MOE_PRINT_ERR"):
            print(f"{name}: {e:.1e}")
        assert e <= tol, f"{name}: err_ratio {e:.2e}"


def _padding(plan) -> torch.Tensor:  # noqa: ANN001
    pad = torch.ones(plan.rows, dtype=torch.bool, device=plan.slot_row.device)
    pad[plan.slot_row] = False
    return pad


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _ids(kind: str, N: int, k: int, E: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        ids = torch.randint(0, E, (N, k), generator=gen)
    elif kind == "hole":  # expert 1 gets no tokens
        ids = torch.randint(0, E - 1, (N, k), generator=gen)
        ids = ids + (ids >= 1).long()
    elif kind == "one":  # every token on the last expert
        ids = torch.full((N, k), E - 1)
    elif kind == "all":  # k = E: every token picks every expert, in a random order
        ids = torch.stack([torch.randperm(E, generator=gen) for _ in range(N)])[:, :k]
    else:
        raise ValueError(kind)
    return ids.to(DEVICE)


def _run(mod, name: str, inputs: dict, plan, seed: int) -> dict:  # noqa: ANN001
    """Forward one primitive of `mod` on fresh leaves, backward with a random upstream gradient."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    if name == "gather":
        out = mod.gather_torch(leaves["x"], plan) if mod is tp else mod.gather_triton(leaves["x"], plan)
    elif name == "grouped_mm":
        fn = tp.grouped_mm_torch if mod is tp else tr.grouped_mm_triton
        out = fn(leaves["xs"], leaves["w"], plan)
    else:
        fn = tp.scatter_torch if mod is tp else tr.scatter_triton
        out = fn(leaves["ys"], plan, leaves["gates"])
    out.backward(_rand(*out.shape, seed=seed + 100, dtype=out.dtype))
    return {"out": out.detach(), **{"d" + n: t.grad for n, t in leaves.items()}}


def _compare_all(ids: torch.Tensor, E: int, fan_in: int, fan_out: int, block: int, d_in: int, d_out: int,
                 seed: int = 0, x_transposed: bool = False) -> None:
    """gather, grouped_mm and scatter on one plan: Triton vs torch, padding rows zero."""
    plan = make_plan(ids, E, fan_in=fan_in, fan_out=fan_out, block=block)
    pad = _padding(plan)
    x = _rand(d_in, plan.n_in, seed=seed).t() if x_transposed else _rand(plan.n_in, d_in, seed=seed)
    assert x.is_contiguous() != x_transposed
    cases = {
        "gather": ({"x": x}, ("out",)),
        "grouped_mm": ({"xs": _rand(plan.rows, d_in, seed=seed + 1), "w": _rand(E, d_in, d_out, seed=seed + 2)},
                       ("out", "dxs")),
        "scatter": ({"ys": _rand(plan.rows, d_out, seed=seed + 3),
                     "gates": torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 4)).to(DEVICE)},
                    ("dys",)),
    }
    for name, (inputs, padded) in cases.items():
        ref = _run(tp, name, inputs, plan, seed)
        got = _run(tr, name, inputs, plan, seed)
        for p in padded:
            assert (got[p][pad] == 0).all(), f"{name}: padding rows of {p} not zero"
        _check(got, ref)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("kind", ["random", "hole", "one"])
def test_sigma_moe_matches_torch(kind, block):
    """N = 37 rows, k = 3, E = 5: F = 111 is not a multiple of the block."""
    _compare_all(_ids(kind, 37, 3, 5, seed=1), 5, 3, 3, block, 20, 24, seed=2)


def test_single_expert():
    _compare_all(_ids("random", 23, 2, 1, seed=3), 1, 2, 2, 16, 24, 20, seed=4)


def test_k_equals_e():
    _compare_all(_ids("all", 13, 4, 4, seed=5), 4, 4, 4, 16, 20, 24, seed=6)


@pytest.mark.parametrize("fan_in,fan_out", [(6, 2), (2, 6)])
def test_switchhead_mappings(fan_in, fan_out):
    """SwitchHead V (fan_in = H·2, fan_out = 2) and O (the reverse), H = 3: ids [T, H, 2]."""
    ids = torch.randint(0, 5, (11, 3, 2), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    _compare_all(ids, 5, fan_in, fan_out, 16, 20, 24, seed=8)


def test_several_tiles_and_noncontiguous_input(monkeypatch):
    """d_in = 70, d_out = 72: several (partial) K and N tiles of the matmuls and of dW; feature tiles of 16
    so gather / scatter run several d tiles (scatter backward loops over them); x a transposed view."""
    monkeypatch.setattr(tr, "MAX_BD", 16)
    _compare_all(_ids("random", 19, 2, 3, seed=9), 3, 2, 2, 32, 70, 72, seed=10, x_transposed=True)


def test_noncontiguous_weight():
    """W given as a transposed view: the kernels read it through its strides (forward and dxs)."""
    ids = _ids("hole", 21, 2, 4, seed=11)
    plan = make_plan(ids, 4, fan_in=2, fan_out=2, block=16)
    w = _rand(4, 24, 20, seed=12).transpose(1, 2)
    inputs = {"xs": _rand(plan.rows, 20, seed=13), "w": w}
    ref, got = _run(tp, "grouped_mm", inputs, plan, 14), _run(tr, "grouped_mm", inputs, plan, 14)
    _check(got, ref)


def _mlp_inputs(N: int, k: int, E: int, d: int, es: int, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    return {"x": _rand(N, d, seed=seed, dtype=dtype),
            "gates": torch.rand(N, k, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype),
            "w_in": _rand(E, d, es, seed=seed + 2, dtype=dtype) / d ** 0.5,
            "w_out": _rand(E, es, d, seed=seed + 3, dtype=dtype) / es ** 0.5}


def _mlp(inputs: dict, ids: torch.Tensor, k: int, seed: int, **kw) -> dict:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    y = expert_mlp(leaves["x"], ids, leaves["gates"], leaves["w_in"], leaves["w_out"], fan_in=k, fan_out=k, **kw)
    y.backward(_rand(*y.shape, seed=seed + 50, dtype=y.dtype))
    return {"y": y.detach(), **{"d" + n: t.grad for n, t in leaves.items()}}


def test_expert_mlp_triton_matches_torch_and_oracle():
    N, k, E = 37, 3, 5
    ids = _ids("hole", N, k, E, seed=15)
    inputs = _mlp_inputs(N, k, E, 20, 24, seed=16)
    got = _mlp(inputs, ids, k, 16, backend="triton", block=16)
    _check(got, _mlp(inputs, ids, k, 16, backend="torch", block=16))
    _check(got, _mlp(inputs, ids, k, 16, backend="torch"))  # exact segments (block 1) on the torch path
    leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    y = expert_mix_reference(leaves["x"], ids, leaves["gates"], [leaves["w_in"], leaves["w_out"]], fan_in=k, fan_out=k)
    y.backward(_rand(*y.shape, seed=66, dtype=torch.float64))
    ref = {"y": y.detach(), **{"d" + n: t.grad for n, t in leaves.items()}}
    _check({n: t.double() for n, t in got.items()}, ref)


def test_deterministic():
    """Same inputs twice through the Triton path: bitwise-identical outputs and gradients."""
    ids = _ids("random", 37, 3, 5, seed=17)
    inputs = _mlp_inputs(37, 3, 5, 20, 24, seed=18)
    a = _mlp(inputs, ids, 3, 18, backend="triton", block=16)
    b = _mlp(inputs, ids, 3, 18, backend="triton", block=16)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_fp16_close_to_fp32_torch():
    """fp16 inputs through the Triton path (fp32 accumulation) vs the fp32 torch path: ~1e-2 relative."""
    ids = _ids("random", 37, 3, 5, seed=19)
    inputs = _mlp_inputs(37, 3, 5, 20, 24, seed=20, dtype=torch.float16)
    got = _mlp(inputs, ids, 3, 20, backend="triton", block=16)
    assert all(t.dtype == torch.float16 for t in got.values())
    ref = _mlp({n: t.float() for n, t in inputs.items()}, ids, 3, 20, backend="torch", block=16)
    _check({n: t.float() for n, t in got.items()}, ref, tol=1e-2)


def test_rejects_small_block():
    ids = _ids("random", 8, 2, 3, seed=21)
    plan = make_plan(ids, 3, fan_in=2, fan_out=2, block=8)
    with pytest.raises(ValueError, match="block"):
        tr.gather_triton(_rand(8, 16, seed=22), plan)
