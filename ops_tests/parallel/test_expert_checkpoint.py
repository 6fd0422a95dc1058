"""Checkpoints of an expert-parallel MoEUT: a resume under the same ep is bitwise exact (DeepSpeed's MoE
layout, one file per global expert), and a resume under another ep (through the consolidated export)
continues the uninterrupted run."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, SPLIT, GLOBAL, SEQ, VOCAB = 4, 2, 8, 16, 128


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _phase(rank: int, world: int, ep: int, zero: int, root: str, first: int, last: int) -> dict:
    """Train steps [first, last) with experts over `ep` of the `world` data-parallel ranks, loading
    from `root` when first > 0, saving at the end; returns losses and the whole parameters."""
    import models
    from parallel import checkpoint, safe_load
    from parallel.engine import EngineConfig, build_engine
    from parallel.expert import gather_experts
    from parallel.parallelize import parallelize
    from parallel.step import train_step
    from parallel.topology import Topology, build_groups

    groups = build_groups(Topology(dp=world, ep=ep), rank)
    torch.manual_seed(0)
    model = models.build(models.make_config("moeut", "tiny", vocab_size=VOCAB, max_seq_len=SEQ))
    module, loss_fn = parallelize(model, "moeut", groups)
    engine = build_engine(module, EngineConfig(micro_batch=GLOBAL // world // 2, grad_accum=2, dp=world, zero=zero,
                                               lr=1e-2, eps=1e-4, warmup_steps=1, total_steps=STEPS, grad_clip=1.0),
                          groups)
    if first:
        assert checkpoint.load(engine, checkpoint.latest_good(Path(root)))["step"] == first
    losses = [train_step(engine, list(_batches()[s].chunk(world)[rank].chunk(2)), torch.device("cpu"), loss_fn).loss
              for s in range(first, last)]
    saved = checkpoint.save(engine, Path(root), last, {"step": last}, {"dp": world, "world": world}, keep=2)
    safe_load.refuse_unsafe(saved)  # DeepSpeed's expert files too hold nothing that runs code
    ep_group = groups["ep"] if ep > 1 else None
    params = {n: gather_experts(p, ep_group) for n, p in engine.module.named_parameters()}
    files = sorted(p.name for p in (Path(root) / f"step_{last}").glob("layer_*_expert_*")) if rank == 0 else []
    return {"losses": losses, "params": params, "expert_files": files}


@pytest.mark.parametrize("zero", [0, 1])
def test_same_ep_resume_is_bitwise_exact(zero):
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as root:
        ref = spawn_ranks(_phase, 2, 2, zero, ref_dir, 0, STEPS)
        first = spawn_ranks(_phase, 2, 2, zero, root, 0, SPLIT)
        resumed = spawn_ranks(_phase, 2, 2, zero, root, SPLIT, STEPS)
    # tiny: 2 shared layers with 8 experts each, one file per (layer, global expert) whatever the ep
    assert len(first[0]["expert_files"]) == 2 * 8
    for a, b in zip(ref, resumed):
        assert b["losses"] == a["losses"][SPLIT:]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_under_another_ep_continues_the_run(before, after):
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as root:
        ref = spawn_ranks(_phase, 2, after, 1, ref_dir, 0, STEPS)[0]
        spawn_ranks(_phase, 2, before, 1, root, 0, SPLIT)
        resumed = spawn_ranks(_phase, 2, after, 1, root, SPLIT, STEPS)
    for r in resumed:
        assert r["losses"] == pytest.approx(ref["losses"][SPLIT:], rel=1e-5)
        assert_state_close(ref["params"], r["params"], rel=1e-5)
