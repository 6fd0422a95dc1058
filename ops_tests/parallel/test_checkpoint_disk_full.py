"""A checkpoint write that hits a full disk (a real size-limited tmpfs) publishes nothing, leaves the
previous checkpoint intact and loadable, and leaves every rank in step (no collective left hanging)."""
from __future__ import annotations

import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from spawn_ranks import spawn_ranks
from test_checkpoint_resume import _engine, _run_steps


def _save_twice(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from parallel import checkpoint

    engine = _engine(world, 1)
    _run_steps(engine, rank, world, range(1))
    first = checkpoint.save(engine, Path(root), 1, {"step": 1}, {"dp": world, "world": world}, keep=3)
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    _run_steps(engine, rank, world, range(1, 2))
    error = None
    try:
        checkpoint.save(engine, Path(root), 2, {"step": 2}, {"dp": world, "world": world}, keep=3)
    except checkpoint.CheckpointWriteError as e:
        error = str(e)
    alive = torch.ones(1)
    dist.all_reduce(alive)  # every rank left save() at the same point: the group still works
    return {"first": str(first), "saved": saved, "error": error, "alive": alive.item()}


def _load(rank: int, world: int, root: str) -> dict:
    from parallel import checkpoint

    engine = _engine(world, 1)
    path = checkpoint.latest_good(Path(root))
    client = checkpoint.load(engine, path)
    return {"path": str(path), "client": client, "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def _tmpfs(size_bytes: int):
    with tempfile.TemporaryDirectory() as mnt:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", mnt], capture_output=True, text=True)
        assert r.returncode == 0, f"this test needs to mount a small tmpfs (root): {r.stderr}"
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", "-l", mnt], check=False)


def test_disk_full_during_checkpoint_keeps_the_previous_one():
    with tempfile.TemporaryDirectory() as probe:
        spawn_ranks(_save_twice, 2, probe)
        one = _du(Path(probe) / "step_1")
    # Room for one checkpoint and a half: the second cannot fit while the first is kept.
    with _tmpfs(int(one * 1.5)) as root:
        out = spawn_ranks(_save_twice, 2, str(root / "ckpt"))
        for r in out:
            assert r["alive"] == 2
            assert r["error"] is not None and "No space left on device" in r["error"], r["error"]
            assert "step_2" in r["error"] and "step_1" in r["error"]  # names the failed one and the one still good
        ckpt = root / "ckpt"
        # (DeepSpeed also copies its zero_to_fp32.py / zero_to_torch.py recovery scripts next to the checkpoints.)
        entries = sorted(p.name for p in ckpt.iterdir() if not p.name.endswith(".py"))
        assert entries == ["latest", "step_1"], f"a partial checkpoint was left behind: {entries}"
        assert (ckpt / "latest").read_text() == "step_1"
        loaded = spawn_ranks(_load, 2, str(ckpt))
    for r in loaded:
        assert r["path"].endswith("step_1") and r["client"]["step"] == 1
        assert all(torch.equal(out[0]["saved"][k], v) for k, v in r["params"].items())
