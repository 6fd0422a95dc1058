"""The `moe_backend: megablocks` option. megablocks needs CUDA to install, so here:
- the config and launcher refuse it with the key and the allowed values when it does not import (real check);
- our glue (sort/histogram/cumsum → gather → grouped GEMM → scatter, argument order and layouts) runs against a
  CPU FAKE of megablocks' ops written from its documented kernel semantics, and must equal the loop oracle;
- on a CUDA machine where megablocks imports, the real package must equal our Triton path (skipped elsewhere).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from kernels.moe import expert_mix_reference, expert_mlp
from kernels.moe.megablocks_impl import megablocks_missing
from models.moeut import PRESETS, MoEUTConfig

MISSING = megablocks_missing()
LOCAL = Path(__file__).resolve().parents[2] / "cluster_configs" / "local.yaml"


def test_config_refuses_megablocks_when_it_does_not_import():
    if MISSING is None:  # a machine with megablocks: the option must be accepted
        assert MoEUTConfig(**PRESETS["tiny"], moe_backend="megablocks").moe_backend == "megablocks"
        return
    with pytest.raises(ValueError) as info:
        MoEUTConfig(**PRESETS["tiny"], moe_backend="megablocks")
    msg = str(info.value)
    assert "moe_backend" in msg and "allowed here: auto, torch, triton" in msg, msg
    with pytest.raises(ValueError, match="allowed: auto, torch, triton, megablocks"):
        MoEUTConfig(**PRESETS["tiny"], moe_backend="tutel")


def test_launcher_spec_refuses_megablocks_before_any_worker():
    from launcher.errors import SpecError
    from launcher.spec import load_spec
    from launcher.validate import validate

    spec = load_spec(LOCAL, ["model.arch=moeut", "model.moe_backend=megablocks"])
    if MISSING is None:  # a machine with megablocks: the spec validates
        validate(spec)
        return
    with pytest.raises(SpecError) as info:
        validate(spec)
    msg = str(info.value)
    assert info.value.key == "model" and "megablocks" in msg and "auto, torch, triton" in msg, msg


def _fake_megablocks() -> dict[str, types.ModuleType]:
    """megablocks.ops / grouped_gemm_util in plain torch, per megablocks/backend/kernels.py: `sort` returns
    (sorted ids, slot indices); gather row i = x[indices[i] // top_k]; scatter writes row i, scaled by
    weights[indices[i]], to slot indices[i] and sums each token's top_k slots; gmm multiplies consecutive row
    segments of batch_sizes (a CPU tensor) by b[e]."""
    ops = types.ModuleType("megablocks.ops")

    def sort(x: torch.Tensor, end_bit: int):
        assert x.dtype == torch.int32 and int(x.max()) < 2 ** end_bit
        values, idx = torch.sort(x, stable=True)
        return values, idx.int()

    ops.sort = sort
    ops.histogram = lambda x, n: torch.bincount(x, minlength=n).int()
    ops.inclusive_cumsum = lambda x, dim: torch.cumsum(x, dim).int()

    def gather(x, indices, bin_ids, bins, top_k):
        assert indices.numel() == x.shape[0] * top_k and bins.dim() == 1
        return x[indices.long() // top_k]

    def scatter(x, indices, bin_ids, weights, bins, top_k):
        out = torch.zeros(indices.numel(), x.shape[1], dtype=x.dtype)
        scaled = x if weights is None else x * weights[indices.long()].unsqueeze(1)
        out = out.index_put((indices.long(),), scaled)
        return out.view(-1, top_k, x.shape[1]).sum(1)

    ops.gather, ops.scatter = gather, scatter
    gg_ops = types.SimpleNamespace()

    def gmm(a, b, batch_sizes, trans_b=False):
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64 and not trans_b
        parts = torch.split(a, batch_sizes.tolist())
        return torch.cat([p @ b[e] for e, p in enumerate(parts)])

    gg_ops.gmm = gmm
    gg = types.ModuleType("megablocks.grouped_gemm_util")
    gg.ops = gg_ops
    root = types.ModuleType("megablocks")
    root.ops, root.grouped_gemm_util = ops, gg
    return {"megablocks": root, "megablocks.ops": ops, "megablocks.grouped_gemm_util": gg}


@pytest.mark.parametrize("N,k,E", [(17, 3, 5), (8, 1, 1), (6, 4, 4), (12, 2, 8)])
def test_megablocks_glue_against_cpu_fake_of_megablocks_ops(monkeypatch, N, k, E):
    for name, module in _fake_megablocks().items():
        monkeypatch.setitem(sys.modules, name, module)
    assert megablocks_missing() is None
    gen = torch.Generator().manual_seed(N * 100 + E)
    d, es = 6, 5
    x = torch.randn(N, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    ids[ids == min(1, E - 1)] = 0  # an expert with no token (when E > 1)
    gates = torch.rand(N, k, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, d, es, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, es, d, generator=gen, dtype=torch.float64, requires_grad=True)
    got = expert_mlp(x, ids, gates, w1, w2, fan_in=k, fan_out=k, backend="megablocks")
    want = expert_mix_reference(x, ids, gates, [w1, w2], fan_in=k, fan_out=k)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (x, gates, w1, w2), dy)
    g_want = torch.autograd.grad(want, (x, gates, w1, w2), dy)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_megablocks_refuses_mappings_it_has_not():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="fan_in == fan_out"):
        expert_mlp(x, torch.zeros(4 * 2, dtype=torch.long), torch.ones(8), torch.randn(1, 3, 3),
                   fan_in=2, fan_out=1, backend="megablocks")


@pytest.mark.skipif(MISSING is not None or not torch.cuda.is_available(), reason=f"needs CUDA and megablocks: {MISSING}")
def test_real_megablocks_matches_triton_path_on_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    N, k, E, d, es = 1024, 4, 16, 256, 128
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x, w1, w2 = r(N, d), r(E, d, es) / d ** 0.5, r(E, es, d) / es ** 0.5
    ids = torch.rand(N, E, generator=gen, device="cuda").topk(k, dim=-1).indices
    gates = torch.rand(N, k, generator=gen, device="cuda").to(torch.bfloat16)
    got = expert_mlp(x, ids, gates, w1, w2, fan_in=k, fan_out=k, backend="megablocks").float()
    want = expert_mlp(x, ids, gates, w1, w2, fan_in=k, fan_out=k, backend="triton").float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
