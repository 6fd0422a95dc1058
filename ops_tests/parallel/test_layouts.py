"""Layout equivalence: every layout trains like one process (fp32, gloo): per-step losses for 5 steps
and the final (gathered) parameters agree to 1e-5 relative. One harness; architectures and layouts
register here as they land."""
from __future__ import annotations

import pytest
import torch

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, GLOBAL, MICRO, SEQ, VOCAB = 5, 8, 2, 16, 128
EPS = 1e-6  # see test_engine_dp: keeps Adam's sign noise on near-zero gradients below the tolerance

ARCHS = {"transformer": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)}
LAYOUTS = {
    "dp2-zero1": dict(dp=2, zero=1),
    "dp2-zero2": dict(dp=2, zero=2),
    "tp2": dict(tp=2, zero=1),
    "tp2-zero0": dict(tp=2, zero=0),
    "tp2xdp2": dict(tp=2, dp=2, zero=1),
}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _train(rank: int, world: int, arch: str, layout: dict) -> dict:
    import models
    from parallel.apply_tp import apply_tensor_parallel
    from parallel.engine import EngineConfig, build_engine
    from parallel.mpu import MPU
    from parallel.step import lm_loss, train_step
    from parallel.tensor import gather_full, vocab_parallel_loss
    from parallel.topology import Topology, build_groups

    tp, dp, zero = layout.get("tp", 1), layout.get("dp", 1), layout.get("zero", 1)
    topo = Topology(tp=tp, dp=dp)
    assert topo.world == world
    groups = build_groups(topo, rank)
    torch.manual_seed(0)
    model = models.build(models.make_config(arch, "tiny", vocab_size=VOCAB, max_seq_len=SEQ, **ARCHS[arch]))
    tp_group = groups["tp"] if tp > 1 else None
    if tp_group is not None:
        apply_tensor_parallel(model, models.get_spec(arch).tp_plan, tp_group)
    micro = MICRO if world > 1 else GLOBAL
    accum = GLOBAL // dp // micro
    engine = build_engine(model, EngineConfig(micro_batch=micro, grad_accum=accum, dp=dp, zero=zero, lr=1e-2, eps=EPS,
                                              warmup_steps=2, total_steps=STEPS, grad_clip=1.0), mpu=MPU(groups))
    loss_fn = vocab_parallel_loss(tp_group) if tp_group is not None else lm_loss
    dp_rank = topo.coords(rank)["dp"]
    initial = {n: gather_full(p, tp_group) for n, p in engine.module.named_parameters()}
    losses = []
    for batch in _batches():
        mine = batch.chunk(dp)[dp_rank]
        losses.append(train_step(engine, list(mine.chunk(accum)), torch.device("cpu"), loss_fn).loss)
    params = {n: gather_full(p, tp_group) for n, p in engine.module.named_parameters()}
    return {"losses": losses, "params": params, "initial": initial}


@pytest.fixture(scope="module")
def single() -> dict:
    return {arch: spawn_ranks(_train, 1, arch, {})[0] for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(single, arch, name):
    layout = LAYOUTS[name]
    world = layout.get("tp", 1) * layout.get("dp", 1)
    ref = single[arch]
    for r in spawn_ranks(_train, world, arch, layout):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert_state_close(ref["initial"], r["initial"], rel=0)  # every layout starts from the same weights
        assert_state_close(ref["params"], r["params"], rel=1e-5)
    # the check has teeth: training moved the parameters far beyond the tolerance
    moved = max((ref["params"][k] - v).abs().max().item() for k, v in ref["initial"].items())
    assert moved > 1e-3
