"""Resharding: a checkpoint written under one layout (tp, pp, dp) resumes under another through the
consolidated export, and the run continues as the uninterrupted single-process run does (fp32, 1e-5):
losses after the resume, the LR, and every parameter."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, SPLIT, GLOBAL, MICRO, SEQ, VOCAB = 5, 3, 8, 2, 16, 128
EPS = 1e-4  # as in test_layouts: Adam turns reduction-order noise on near-zero gradients into large update differences


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _world(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)


def _phase(rank: int, world: int, layout: dict, root: str, first: int, last: int) -> dict:
    """Train steps [first, last) under `layout`, resuming from `root` when first > 0, saving at the end."""
    import models
    from parallel import checkpoint, safe_load
    from parallel.engine import EngineConfig, build_engine
    from parallel.parallelize import parallelize
    from parallel.pipeline import canonical_parameters
    from parallel.step import train_step
    from parallel.tensor import gather_full
    from parallel.topology import Topology, build_groups

    tp, pp, dp = layout.get("tp", 1), layout.get("pp", 1), layout.get("dp", 1)
    topo = Topology(tp=tp, pp=pp, dp=dp)
    groups = build_groups(topo, rank)
    torch.manual_seed(0)
    cfg = models.make_config("transformer", "tiny", vocab_size=VOCAB, max_seq_len=SEQ, d_model=64, n_layers=2,
                             n_heads=4, n_kv_heads=2)
    module, loss_fn = parallelize(models.build(cfg), "transformer", groups)
    accum = GLOBAL // dp // MICRO
    engine = build_engine(module, EngineConfig(micro_batch=MICRO, grad_accum=accum, dp=dp, zero=layout.get("zero", 1),
                                               lr=1e-2, eps=EPS, warmup_steps=2, total_steps=STEPS, grad_clip=1.0),
                          groups)
    if first:
        client = checkpoint.load(engine, checkpoint.latest_good(Path(root)))
        assert client["step"] == first
    dp_rank = topo.coords(rank)["dp"]
    losses = [train_step(engine, list(b.chunk(dp)[dp_rank].chunk(accum)), torch.device("cpu"), loss_fn).loss
              for b in _batches()[first:last]]
    saved = checkpoint.save(engine, Path(root), last, {"step": last}, {"world": world}, keep=2)
    safe_load.refuse_unsafe(saved)  # every file this layout wrote (pipeline layers, TP ranks) loads without code
    tp_group = groups["tp"] if tp > 1 else None
    params = {n: gather_full(p, tp_group) for n, p in canonical_parameters(engine.module)}
    return {"losses": losses, "params": params, "lr": engine.get_lr()[0]}


RESHARDS = {
    "tp2-to-tp1": (dict(tp=2), dict()),
    "tp1-to-tp2": (dict(), dict(tp=2)),
    "pp2-to-pp1": (dict(pp=2), dict()),
    "tp2xpp2-to-dp2": (dict(tp=2, pp=2), dict(dp=2)),
    "dp2-zero1-to-tp2xpp2": (dict(dp=2, zero=1), dict(tp=2, pp=2)),
}


@pytest.mark.parametrize("name", RESHARDS)
def test_resume_under_another_layout_continues_the_run(name):
    before, after = RESHARDS[name]
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as root:
        ref = spawn_ranks(_phase, 1, {}, ref_dir, 0, STEPS)[0]
        spawn_ranks(_phase, _world(before), before, root, 0, SPLIT)
        resumed = spawn_ranks(_phase, _world(after), after, root, SPLIT, STEPS)
        manifest = (Path(root) / f"step_{SPLIT}" / "manifest.json").read_text()
    assert f'"tp": {before.get("tp", 1)}' in manifest and f'"pp": {before.get("pp", 1)}' in manifest
    seen: set[str] = set()
    for r in resumed:
        assert r["losses"] == pytest.approx(ref["losses"][SPLIT:], rel=1e-5)
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert_state_close({k: ref["params"][k] for k in r["params"]}, r["params"], rel=1e-5)
        seen |= set(r["params"])
    assert seen == set(ref["params"])
