"""Context-parallel DeltaNet (spec §6) equals one rank on the same sequence, on 2 and 4 gloo ranks, with
slices cut mid-chunk and varlen batches whose sequences span ranks; traffic does not grow with T.

fp32: the output and every per-token gradient (layer input; q, k, v after the convs, β, g) to 1e-6
relative; weight gradients (projections, convs, decay, output norm) to 1e-5: each sums every token
and ranks sum in another order (A_log's sum of ~300 terms cancels to ~2e-6 of fp32 noise). float64:
all of it to 1e-10, which is where exactness shows."""
from __future__ import annotations

import pytest
import torch

from compare import err_ratio
from spawn_ranks import spawn_ranks

D, H, CHUNK = 32, 2, 16
TOL = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-10, 1e-10)}  # (per token, weights)


def _mixer(decay_gate: bool, dtype: torch.dtype):  # noqa: ANN202
    from models.layers.delta_net import DeltaNetMixer

    torch.manual_seed(0)
    m = DeltaNetMixer(D, H, D // H, chunk_size=CHUNK, decay_gate=decay_gate, output_gate=True, backend="torch")
    m.init_weights(0.3, 0.3)  # larger than the LM's init: every path carries signal
    inputs = {}  # the per-token tensors entering the delta rule (after convs and norms), to compare their gradients
    core = m.core

    def spy(xs, cu):  # noqa: ANN001, ANN202
        for name, t in zip(("q", "k", "v", "beta", "g"), xs):
            if t is not None:
                t.retain_grad()
                inputs[name] = t
        return type(core).recurrence(core, xs, cu)  # the class in force (context parallel or not)
    core.recurrence = spy
    return m.to(dtype), inputs


def _data(B: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, D, generator=g, dtype=dtype), torch.randn(B, T, D, generator=g, dtype=dtype)


def _run(rank: int, world: int, B: int, T: int, cu: list[int] | None, decay_gate: bool,
         dtype: torch.dtype = torch.float32) -> dict:
    import torch.distributed as dist

    from parallel.context import apply_context_parallel

    m, inputs = _mixer(decay_gate, dtype)
    x, dy = _data(B, T, dtype)
    cu_t = torch.tensor(cu) if cu is not None else None
    sent = []
    if world > 1:
        assert apply_context_parallel(m, "core", dist.group.WORLD) == 1
        L = T // world
        x, dy = x[:, rank * L:(rank + 1) * L], dy[:, rank * L:(rank + 1) * L]
        for name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
            if hasattr(dist, name):
                real = getattr(dist, name)

                def counted(out, inp, *a, _real=real, **kw):  # noqa: ANN001, ANN202
                    sent.append(inp.numel() * inp.element_size())
                    return _real(out, inp, *a, **kw)
                setattr(dist, name, counted)
    x = x.clone().requires_grad_(True)
    y = m(x, cu_t)
    (y * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    per_token = {"y": y.detach(), "dx": x.grad.clone(), **{f"d{n}": t.grad.clone() for n, t in inputs.items()}}
    return {"per_token": per_token, "grads": grads, "bytes": sum(sent)}


def _check(B: int, T: int, world: int, cu: list[int] | None, decay_gate: bool) -> None:
    for dtype, (tol_token, tol_weight) in TOL.items():
        ref = spawn_ranks(_run, 1, B, T, cu, decay_gate, dtype)[0]
        ranks = spawn_ranks(_run, world, B, T, cu, decay_gate, dtype)
        assert {"y", "dx", "dq", "dk", "dv", "dbeta"} <= set(ref["per_token"])
        assert ("dg" in ref["per_token"]) == decay_gate
        for key, want in ref["per_token"].items():
            got = torch.cat([r["per_token"][key] for r in ranks], dim=1)  # the slices in rank order
            assert err_ratio(want, got) <= tol_token, (dtype, key, err_ratio(want, got))
        for name, want in ref["grads"].items():
            got = sum(r["grads"][name] for r in ranks)  # each rank's gradient covers its own tokens
            assert err_ratio(want, got) <= tol_weight, (dtype, name, err_ratio(want, got))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("decay_gate", [False, True])
def test_cp_equals_one_rank_batch_rows_cut_mid_chunk(world, decay_gate):
    _check(B=2, T=40 * world, world=world, cu=None, decay_gate=decay_gate)  # 40 tokens per rank: 2.5 chunks of 16


def test_cp4_varlen_sequences_span_ranks():
    # ranks hold [0,40) [40,80) [80,120) [120,160): a sequence ending on a rank edge, a length-1 sequence
    # starting on one, one inside rank 1, one from rank 1 over ranks 2 and 3 (rank 3 folds two summaries),
    # then short ones inside rank 3
    cu = [0, 5, 40, 41, 71, 130, 133, 160]
    _check(B=1, T=160, world=4, cu=cu, decay_gate=True)


def test_cp2_one_sequence_starting_mid_slice_over_every_rank():
    _check(B=1, T=96, world=2, cu=[0, 17, 96], decay_gate=False)


def test_cp_traffic_does_not_grow_with_sequence_length():
    short = spawn_ranks(_run, 2, 1, 64, None, False)
    long = spawn_ranks(_run, 2, 1, 256, None, False)
    assert short[0]["bytes"] > 0
    assert [r["bytes"] for r in short] == [r["bytes"] for r in long]
