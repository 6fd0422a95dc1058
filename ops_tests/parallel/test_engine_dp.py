"""Data parallelism through the DeepSpeed engine equals one process on the combined batch (fp32, gloo)."""
from __future__ import annotations

import pytest
import torch

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS = 5
MICRO = 2
# Adam divides by sqrt(v): with eps 1e-8 a near-zero gradient whose sign flips under another
# summation order moves its weight by ~lr. A larger eps keeps that noise below the tolerance
# while a real DP error (wrong scaling, a missed reduction) still moves every parameter.
EPS = 1e-6


def _batches(global_batch: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g) for _ in range(STEPS)]


def _train(rank: int, world: int, zero: int, accum: int) -> dict:
    import models
    from parallel.engine import EngineConfig, build_engine
    from parallel.step import train_step

    torch.manual_seed(0)
    cfg = models.make_config("transformer", "tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)
    model = models.build(cfg)
    global_batch = MICRO * accum * 2  # the dp2 run's global batch; the reference takes it whole
    micro = MICRO if world > 1 else global_batch  # the reference takes the whole batch in one micro-batch
    engine = build_engine(model, EngineConfig(micro_batch=micro, grad_accum=accum if world > 1 else 1, dp=world,
                                              zero=zero, lr=1e-2, eps=EPS, warmup_steps=2, total_steps=STEPS, grad_clip=1.0))
    losses = []
    for batch in _batches(global_batch, 16, 256):
        mine = batch.chunk(world)[rank] if world > 1 else batch
        micro_batches = list(mine.chunk(accum)) if world > 1 else [mine]
        losses.append(train_step(engine, micro_batches, torch.device("cpu")).loss)
    params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "params": params}


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = {accum: spawn_ranks(_train, 1, 0, accum)[0] for accum in (1, 2)}
    ref["initial"] = spawn_ranks(_initial, 1)[0]
    return ref


@pytest.mark.parametrize("zero,accum", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2)])
def test_dp2_equals_single_process(reference, zero, accum):
    ref = reference[accum]
    out = spawn_ranks(_train, 2, zero, accum)
    for r in out:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert_state_close(ref["params"], r["params"], rel=1e-5)
    # the check has teeth: training moved the parameters well beyond the tolerance
    start = reference["initial"]
    moved = max((ref["params"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3


def _initial(rank: int, world: int) -> dict:
    import models

    torch.manual_seed(0)
    cfg = models.make_config("transformer", "tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)
    return {k: v.detach().clone() for k, v in models.build(cfg).state_dict().items()}
