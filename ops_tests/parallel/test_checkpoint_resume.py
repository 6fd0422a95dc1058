"""Checkpoints through a real DeepSpeed engine on gloo ranks: elastic resume on another data-parallel
size continues the run it would have been, and a non-finite step never reaches the weights."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, SPLIT, GLOBAL, SEQ, VOCAB = 6, 3, 8, 16, 256


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _engine(world: int, zero: int):
    import models
    from parallel.engine import EngineConfig, build_engine

    torch.manual_seed(0)
    cfg = models.make_config("transformer", "tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=SEQ)
    micro = GLOBAL // world // 2  # two micro-batches per step whatever the world: accumulation is exercised too
    return build_engine(models.build(cfg), EngineConfig(micro_batch=micro, grad_accum=2, dp=world, zero=zero, lr=1e-2,
                                                        eps=1e-6, warmup_steps=2, total_steps=STEPS, grad_clip=1.0))


def _run_steps(engine, rank: int, world: int, steps: range) -> list[float]:
    from parallel.step import train_step

    losses = []
    for s in steps:
        mine = _batches()[s].chunk(world)[rank]
        losses.append(train_step(engine, list(mine.chunk(2)), torch.device("cpu")).loss)
    return losses


def _phase(rank: int, world: int, zero: int, root: str, first: int, last: int) -> dict:
    """Train steps [first, last) on `world` ranks, loading from `root` if first > 0 and saving at the end."""
    from parallel import checkpoint

    engine = _engine(world, zero)
    if first:
        client = checkpoint.load(engine, checkpoint.latest_good(Path(root)))
        assert client["step"] == first
    losses = _run_steps(engine, rank, world, range(first, last))
    checkpoint.save(engine, Path(root), last, {"step": last}, {"dp": world, "world": world}, keep=2)
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "lr": engine.get_lr()[0]}


@pytest.mark.parametrize("zero,before,after", [(1, 2, 1), (1, 1, 2), (2, 2, 1), (0, 2, 1)])
def test_elastic_resume_continues_the_uninterrupted_run(zero, before, after):
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as root:
        ref = spawn_ranks(_phase, after, zero, ref_dir, 0, STEPS)[0]
        spawn_ranks(_phase, before, zero, root, 0, SPLIT)
        resumed = spawn_ranks(_phase, after, zero, root, SPLIT, STEPS)
    for r in resumed:
        assert r["losses"] == pytest.approx(ref["losses"][SPLIT:], rel=1e-5)
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert_state_close(ref["params"], r["params"], rel=1e-5)


def _same_layout(rank: int, world: int, root: str) -> dict:
    from parallel import checkpoint

    engine = _engine(world, 1)
    checkpoint.load(engine, checkpoint.latest_good(Path(root)))
    losses = _run_steps(engine, rank, world, range(SPLIT, STEPS))
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


def test_same_layout_resume_is_bitwise_exact():
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as root:
        ref = spawn_ranks(_phase, 2, 1, ref_dir, 0, STEPS)
        spawn_ranks(_phase, 2, 1, root, 0, SPLIT)
        resumed = spawn_ranks(_same_layout, 2, root)
    for a, b in zip(ref, resumed):
        assert b["losses"] == a["losses"][SPLIT:]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def _nan_step(rank: int, world: int, zero: int) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    from parallel.step import train_step

    engine = _engine(world, zero)
    _run_steps(engine, rank, world, range(2))
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    p0 = next(engine.module.parameters())
    moment = (safe_get_full_optimizer_state(p0, "exp_avg") if zero else engine.optimizer.state[p0]["exp_avg"]).clone()
    lr_before = engine.get_lr()[0]
    poison = engine.module.register_forward_hook(lambda m, i, out: out * float("nan") if rank == world - 1 else out)
    res = train_step(engine, list(_batches()[2].chunk(world)[rank].chunk(2)), torch.device("cpu"))
    poison.remove()
    after = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    moment_after = (safe_get_full_optimizer_state(p0, "exp_avg") if zero else engine.optimizer.state[p0]["exp_avg"]).clone()
    lr_after = engine.get_lr()[0]
    nxt = _run_steps(engine, rank, world, range(3, 4))
    return {"skipped": res.skipped, "finite": res.finite, "lr_held": lr_after == lr_before,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "moment_unchanged": torch.equal(moment, moment_after), "next": nxt[0],
            "moved_after": any(not torch.equal(after[k], v) for k, v in engine.module.state_dict().items())}


@pytest.mark.parametrize("zero", [0, 1])
def test_nonfinite_step_is_skipped_on_every_rank(zero):
    for r in spawn_ranks(_nan_step, 2, zero):
        assert r["skipped"] and not r["finite"]
        assert r["unchanged"] and r["moment_unchanged"], "a NaN step reached the weights or Adam's moments"
        assert r["lr_held"], "a skipped step advanced the LR schedule"
        assert torch.isfinite(torch.tensor(r["next"])) and r["moved_after"], "training did not go on after the skip"
