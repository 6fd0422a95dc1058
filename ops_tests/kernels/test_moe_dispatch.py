"""Dropless dispatch (pure-torch path) against the per-assignment loop oracle: the routing plan's integer
bookkeeping, forward and every gradient in float64 (`gradcheck` and equality to the loop) and fp32
(1e-5 relative), the edge cases of spec §7.2, SwitchHead's fan-in/fan-out mappings, and determinism."""
from __future__ import annotations

import pytest
import torch

from compare import err_ratio
from kernels.moe import expert_mix_reference, expert_mlp, gather, grouped_mm, make_plan, scatter


def _ids(N: int, k: int, E: int, gen: torch.Generator, mode: str = "random") -> torch.Tensor:
    if mode == "one_expert":  # every token on expert E-1 (k must be 1 for distinct choices)
        return torch.full((N, k), E - 1)
    if mode == "skip_expert_1":  # expert 1 gets no token
        pool = torch.tensor([e for e in range(E) if e != 1])
        return torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(N)])
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])


def _case(N: int, k: int, E: int, d: int, es: int, dtype: torch.dtype, seed: int = 0, mode: str = "random"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, w1, w2 = r(N, d), r(E, d, es) / d ** 0.5, r(E, es, d) / es ** 0.5
    gates = torch.rand(N, k, generator=gen, dtype=dtype)
    return x, _ids(N, k, E, gen, mode), gates, w1, w2


def test_plan_bookkeeping_matches_python():
    gen = torch.Generator().manual_seed(1)
    E, block = 6, 4
    ids = torch.randint(0, E, (23, 3), generator=gen)
    ids[ids == 2] = 3  # expert 2 empty
    plan = make_plan(ids, E, fan_in=3, fan_out=3, block=block)
    flat = ids.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda f: (flat[f], f))  # stable by expert
    assert plan.order.tolist() == order
    counts = [flat.count(e) for e in range(E)]
    assert plan.counts.tolist() == counts
    starts, pos = [], 0
    for c in counts:
        starts.append(pos)
        pos += -(-c // block) * block
    assert plan.padded_offsets.tolist() == starts + [pos]
    seen = {e: 0 for e in range(E)}
    for i, f in enumerate(order):
        e = flat[f]
        assert plan.dst[i] == starts[e] + seen[e] and plan.src[i] == f // 3 and plan.slot_row[f] == plan.dst[i]
        seen[e] += 1
    assert plan.rows >= pos and plan.rows % block == 0
    owners = [next((e for e in range(E) if starts[e] <= b * block < starts[e] + -(-counts[e] // block) * block), -1)
              for b in range(plan.rows // block)]
    assert plan.tile_expert.tolist() == owners
    assert -(-(len(flat) + E * (block - 1)) // block) == plan.tile_expert.numel()  # the static bound, no host sync


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("shape,mode", [
    ((9, 3, 5), "random"),
    ((9, 2, 5), "skip_expert_1"),   # an expert with no tokens
    ((9, 1, 4), "one_expert"),      # all tokens on one expert
    ((7, 1, 1), "random"),          # E = 1
    ((6, 4, 4), "random"),          # k = E
])
def test_expert_mlp_float64_equals_loop_and_gradcheck(shape, mode, block):
    N, k, E = shape
    x, ids, gates, w1, w2 = _case(N, k, E, 5, 3, torch.float64, mode=mode)
    fn = lambda x, g, a, b: expert_mlp(x, ids, g, a, b, fan_in=k, fan_out=k, block=block, backend="torch")  # noqa: E731
    ref = expert_mix_reference(x, ids, gates, [w1, w2], fan_in=k, fan_out=k)
    torch.testing.assert_close(fn(x, gates, w1, w2), ref, rtol=1e-12, atol=1e-12)
    args = [t.clone().requires_grad_() for t in (x, gates, w1, w2)]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", ["value", "output"])
def test_switchhead_fan_mappings_float64(kind):
    """V: input rows t, output rows (t, h): fan_in = H·2, fan_out = 2. O: the reverse."""
    gen = torch.Generator().manual_seed(3)
    T, H, NA, dh, d = 5, 3, 4, 4, 6
    ids = torch.stack([torch.randperm(NA, generator=gen)[:2] for _ in range(T * H)]).view(T, H, 2)
    ids = ids + torch.arange(H).view(1, H, 1) * NA
    gates = torch.rand(T, H, 2, generator=gen, dtype=torch.float64)
    if kind == "value":
        x, w, fan_in, fan_out = torch.randn(T, d, generator=gen, dtype=torch.float64), \
            torch.randn(H * NA, d, dh, generator=gen, dtype=torch.float64), H * 2, 2
    else:
        x, w, fan_in, fan_out = torch.randn(T * H, dh, generator=gen, dtype=torch.float64), \
            torch.randn(H * NA, dh, d, generator=gen, dtype=torch.float64), 2, H * 2
    fn = lambda x, g, w: expert_mlp(x, ids, g, w, fan_in=fan_in, fan_out=fan_out, block=4, backend="torch")  # noqa: E731
    ref = expert_mix_reference(x, ids, gates, [w], fan_in=fan_in, fan_out=fan_out)
    torch.testing.assert_close(fn(x, gates, w), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in (x, gates, w)])


def _grads(fn, tensors):  # noqa: ANN001, ANN202
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out).cos() + torch.arange(out.numel()).view_as(out).sin())
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("block", [1, 64])
def test_fp32_within_1e5_of_the_float64_loop(block):
    """F = 300 slots is not a multiple of the block; x is a non-contiguous view."""
    x, ids, gates, w1, w2 = _case(100, 3, 7, 24, 16, torch.float64, seed=4)
    loop = lambda x, g, a, b: expert_mix_reference(x, ids, g, [a, b], fan_in=3, fan_out=3)  # noqa: E731
    ref, ref_grads = _grads(loop, (x, gates, w1, w2))
    xt = x.float().t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    fast = lambda x, g, a, b: expert_mlp(x, ids, g, a, b, fan_in=3, fan_out=3, block=block, backend="torch")  # noqa: E731
    out, grads = _grads(fast, (xt, gates.float(), w1.float(), w2.float()))
    assert err_ratio(ref, out) <= 1e-5
    for r, g in zip(ref_grads, grads):
        assert err_ratio(r, g) <= 1e-5


def test_padding_rows_stay_zero_and_primitives_compose():
    x, ids, gates, w1, _ = _case(13, 2, 5, 6, 4, torch.float32, seed=5)
    plan = make_plan(ids, 5, fan_in=2, fan_out=2, block=8)
    xs = gather(x, plan, backend="torch")
    ys = grouped_mm(xs, w1, plan, backend="torch")
    real = torch.zeros(plan.rows, dtype=torch.bool)
    real[plan.dst] = True
    assert xs[~real].abs().sum() == 0 and ys[~real].abs().sum() == 0
    y = scatter(ys, plan, gates, backend="torch")
    ref = expert_mix_reference(x, ids, gates, [w1], fan_in=2, fan_out=2)
    assert err_ratio(ref, y) <= 1e-6


def test_same_inputs_twice_bitwise_identical():
    x, ids, gates, w1, w2 = _case(200, 4, 9, 32, 16, torch.float32, seed=6)
    fn = lambda x, g, a, b: expert_mlp(x, ids, g, a, b, fan_in=4, fan_out=4, block=16, backend="torch")  # noqa: E731
    out1, g1 = _grads(fn, (x, gates, w1, w2))
    out2, g2 = _grads(fn, (x, gates, w1, w2))
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_ids_and_fans_are_refused():
    with pytest.raises(ValueError, match="num_experts=3"):
        make_plan(torch.tensor([[0, 3]]), 3, fan_in=2, fan_out=2)
    with pytest.raises(ValueError, match="fan_in=3"):
        make_plan(torch.tensor([[0, 1]]), 3, fan_in=3, fan_out=2)
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        gather(torch.zeros(1, 2), make_plan(torch.tensor([[0]]), 1, fan_in=1, fan_out=1), backend="cuda")
