"""MemoryFormer weighted gather (spec memoryformer.md §1, tests §5.3): y[n] = Σ_k w[n,k]·T[idx[n,k]].

float64: the "index" and "embedding_bag" torch paths against the loop oracle and the dense one-hot form,
forward and both gradients (≤ 1e-12); ∂T non-zero only on selected rows and equal to the scatter of w·∂y;
heavy duplicates; gradcheck; leading dims; backend names; bitwise determinism. Triton: fp32 against the
torch path (err_ratio = RMS(ref − x)/RMS(ref) ≤ 1e-5), fp16 tables looser, unselected rows exactly zero,
bitwise determinism. Without a GPU the kernels run in the Triton interpreter (slow: shapes stay small).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by triton_impl

from kernels.hashed_gather import (  # noqa: E402
    GATHER_BACKENDS,
    make_gather_plan,
    weighted_gather,
    weighted_gather_reference,
)
from kernels.hashed_gather import triton_impl as tr  # noqa: E402
from kernels.hashed_gather.dispatch import pick_gather_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_BACKENDS = ("index", "embedding_bag")
F64_TOL = 1e-12
TOL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(N: int, K: int, rows_per_table: int, h: int, seed: int, dtype: torch.dtype = torch.float64,
            lead: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables [K·2^τ, h], idx with the table offsets k·2^τ added, w in (0, 1); lead overrides [N]."""
    lead = lead or (N,)
    tables = torch.randn(K * rows_per_table, h, generator=_gen(seed), dtype=torch.float64)
    codes = torch.randint(0, rows_per_table, (*lead, K), generator=_gen(seed + 1))
    idx = codes + torch.arange(K) * rows_per_table
    w = torch.rand(*lead, K, generator=_gen(seed + 2), dtype=torch.float64)
    return tables.to(DEVICE, dtype), idx.to(DEVICE), w.to(DEVICE)


def _run(fn, tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, seed: int = 99) -> dict:  # noqa: ANN001
    """Forward on fresh leaves, backward with a fixed random upstream gradient: {y, dT, dw}."""
    T, ww = tables.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(T, idx, ww)
    y.backward(torch.randn(y.shape, generator=_gen(seed), dtype=torch.float64).to(y.device, y.dtype))
    return {"y": y.detach(), "dT": T.grad, "dw": ww.grad}


def _backend(name: str):  # noqa: ANN202
    return lambda T, i, w: weighted_gather(T, i, w, backend=name)


def _max_err(got: dict, ref: dict) -> float:
    return max((got[n].double() - ref[n].double()).abs().max().item() for n in ref)


def _dense(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = Σ_k w_k · onehot(idx_k)ᵀ T: the gather as a matmul with one-hot selectors."""
    onehot = torch.nn.functional.one_hot(idx, tables.shape[0]).to(tables.dtype)
    return torch.einsum("...k,...kr,rh->...h", w, onehot, tables)


def _scatter(idx: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, R: int) -> torch.Tensor:
    """∂T as the plain scatter-add of w·∂y (float64 on CPU: a test oracle, not a kernel)."""
    K = idx.shape[-1]
    contrib = (w.reshape(-1, K, 1) * dy.reshape(-1, 1, dy.shape[-1])).reshape(-1, dy.shape[-1])
    return torch.zeros(R, dy.shape[-1], dtype=dy.dtype, device=dy.device).index_add_(0, idx.reshape(-1), contrib)


def _err_ratio(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    den = ref.pow(2).mean().sqrt().item()
    num = (ref - x).pow(2).mean().sqrt().item()
    return num / den if den else num


# ---------------------------------------------------------------- float64 torch paths


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_torch_paths_match_reference(backend):
    inputs = _inputs(13, 4, 8, 6, seed=1)
    got, ref = _run(_backend(backend), *inputs), _run(weighted_gather_reference, *inputs)
    assert got["y"].dtype == got["dT"].dtype == got["dw"].dtype == torch.float64
    assert _max_err(got, ref) <= F64_TOL


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_torch_paths_match_dense_one_hot(backend):
    inputs = _inputs(17, 3, 8, 5, seed=2)
    assert _max_err(_run(_backend(backend), *inputs), _run(_dense, *inputs)) <= F64_TOL


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_table_grad_is_scatter_of_w_dy_on_selected_rows_only(backend):
    tables, idx, w = _inputs(5, 2, 16, 4, seed=3)  # 10 entries over 32 rows: most rows unselected
    got = _run(_backend(backend), tables, idx, w, seed=4)
    dy = torch.randn(got["y"].shape, generator=_gen(4), dtype=torch.float64).to(DEVICE)
    selected = torch.zeros(tables.shape[0], dtype=torch.bool, device=DEVICE)
    selected[idx.reshape(-1)] = True
    assert (got["dT"][~selected] == 0).all()
    assert (got["dT"][selected] != 0).any(dim=-1).all()
    assert (got["dT"] - _scatter(idx, w, dy, tables.shape[0])).abs().max().item() <= F64_TOL


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_heavy_duplicates(backend):
    """Most entries on one row (and a row picked by every k of some n): long segments."""
    tables, idx, w = _inputs(40, 3, 4, 5, seed=5)
    idx = idx.clone()
    idx[:30] = 2
    idx[30:, :] = 7
    got, ref = _run(_backend(backend), tables, idx, w), _run(weighted_gather_reference, tables, idx, w)
    assert _max_err(got, ref) <= F64_TOL
    assert make_gather_plan(idx, tables.shape[0]).counts.tolist() == [90, 30]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_gradcheck(backend):
    tables, idx, w = _inputs(4, 3, 4, 3, seed=6)
    assert torch.autograd.gradcheck(lambda T, ww: weighted_gather(T, idx, ww, backend=backend),
                                    (tables.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_leading_dims(backend):
    inputs = _inputs(0, 4, 8, 6, seed=7, lead=(2, 5))
    got, ref = _run(_backend(backend), *inputs), _run(weighted_gather_reference, *inputs)
    assert got["y"].shape == (2, 5, 6) and got["dw"].shape == (2, 5, 4)
    assert _max_err(got, ref) <= F64_TOL


def test_shared_plan_and_half_tables_on_torch_paths():
    """A precomputed plan gives the same result; fp16 tables: outputs and ∂T in fp16, ∂w in w's fp32."""
    tables, idx, w = _inputs(11, 4, 8, 6, seed=8)
    plan = make_gather_plan(idx, tables.shape[0])
    a = _run(_backend("index"), tables, idx, w)
    b = _run(lambda T, i, ww: weighted_gather(T, i, ww, backend="index", plan=plan), tables, idx, w)
    assert all(torch.equal(a[n], b[n]) for n in a)
    half = (tables.half(), idx, w.float())
    for backend in TORCH_BACKENDS:
        got = _run(_backend(backend), *half)
        assert (got["y"].dtype, got["dT"].dtype, got["dw"].dtype) == (torch.float16, torch.float16, torch.float32)
        ref = _run(weighted_gather_reference, *half)
        assert all(_err_ratio(got[n], ref[n]) <= 2e-3 for n in ref)


def test_backend_names():
    tables, idx, w = _inputs(3, 2, 4, 4, seed=9)
    with pytest.raises(ValueError, match="allowed: auto, index, embedding_bag, triton"):
        weighted_gather(tables, idx, w, backend="torch")
    assert GATHER_BACKENDS == ("auto", "index", "embedding_bag", "triton")
    expect = "triton" if DEVICE == "cuda" else "embedding_bag"
    assert pick_gather_backend(tables.float(), "auto") == expect
    assert pick_gather_backend(tables, "auto") == "embedding_bag"  # float64 never goes to Triton


def test_bad_inputs():
    tables, idx, w = _inputs(3, 2, 4, 4, seed=10)
    with pytest.raises(ValueError, match="same shape"):
        weighted_gather(tables, idx, w[:, :1])
    with pytest.raises(ValueError, match="outside"):
        make_gather_plan(idx, 3)
    with pytest.raises(ValueError, match="plan for"):
        weighted_gather(tables, idx, w, plan=make_gather_plan(idx[:2], tables.shape[0]))


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_torch_paths_deterministic(backend):
    inputs = _inputs(23, 4, 4, 6, seed=11)
    a, b = _run(_backend(backend), *inputs), _run(_backend(backend), *inputs)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- Triton (interpreter without a GPU)


def _triton_case(dtype: torch.dtype, seed: int, N: int = 37, K: int = 3, h: int = 40) -> tuple:
    """fp32 w; 37 rows n (not a multiple of BN = 32), h = 40 (a partial column tile)."""
    tables, idx, w = _inputs(N, K, 8, h, seed=seed)
    return tables.to(dtype), idx, w.float()


def test_triton_fp32_matches_torch():
    inputs = _triton_case(torch.float32, seed=12)
    got, ref = _run(_backend("triton"), *inputs), _run(_backend("index"), *inputs)
    for n in ref:
        assert got[n].dtype == ref[n].dtype == torch.float32, n
        assert _err_ratio(got[n], ref[n]) <= TOL, n


def test_triton_several_tiles_long_segments_unselected_rows(monkeypatch):
    """Column tiles of 16 (h = 40: 3 tiles, ∂w loops over them), segments longer than BS = 32 (one row
    takes 70 entries), rows never selected exactly zero, fp64 w (cast to fp32 and back)."""
    monkeypatch.setattr(tr, "MAX_BH", 16)
    tables, idx, w = _inputs(70, 2, 16, 40, seed=13)
    idx = idx.clone()
    idx[:, 0] = 5
    tables = tables.float()
    got, ref = _run(_backend("triton"), tables, idx, w), _run(_backend("index"), tables.double(), idx, w)
    unselected = torch.ones(tables.shape[0], dtype=torch.bool, device=DEVICE)
    unselected[idx.reshape(-1)] = False
    assert unselected.any() and (got["dT"][unselected] == 0).all()
    assert got["dw"].dtype == torch.float64
    for n in ref:
        assert _err_ratio(got[n], ref[n]) <= TOL, n


def test_triton_fp16_tables_close_to_fp32_torch():
    tables, idx, w = _triton_case(torch.float16, seed=14)
    got = _run(_backend("triton"), tables, idx, w)
    assert (got["y"].dtype, got["dT"].dtype, got["dw"].dtype) == (torch.float16, torch.float16, torch.float32)
    ref = _run(_backend("index"), tables.float(), idx, w)
    for n in ref:
        assert _err_ratio(got[n], ref[n]) <= 2e-3, n


def test_triton_leading_dims_and_shared_plan():
    tables, idx, w = _inputs(0, 3, 8, 24, seed=15, lead=(2, 7))
    tables, w = tables.float(), w.float()
    plan = make_gather_plan(idx, tables.shape[0])
    got = _run(lambda T, i, ww: weighted_gather(T, i, ww, backend="triton", plan=plan), tables, idx, w)
    ref = _run(_backend("index"), tables, idx, w)
    assert got["y"].shape == (2, 7, 24)
    for n in ref:
        assert _err_ratio(got[n], ref[n]) <= TOL, n


def test_triton_deterministic():
    inputs = _triton_case(torch.float32, seed=16)
    a, b = _run(_backend("triton"), *inputs), _run(_backend("triton"), *inputs)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_triton_rejects_float64():
    tables, idx, w = _inputs(3, 2, 4, 4, seed=17)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        weighted_gather(tables, idx, w, backend="triton")
