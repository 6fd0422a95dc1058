"""A full disk under a real job (the output directory on a size-limited tmpfs, shrunk while the job runs):
the checkpoint that does not fit is not published, the job fails with a message naming the cause
(`fault.checkpoint_errors: fail`), and once the operator makes room `launcher resume` continues from
the previous checkpoint to the end."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from test_launcher_e2e import LOCAL, launcher, status, wait_for_status

pytestmark = pytest.mark.slow


def _args(out: Path, tracking: Path, steps: int) -> list[str]:
    values = {"train.steps": steps, "train.eval_every": 0, "train.checkpoint_every": 2, "train.keep_checkpoints": 1,
              "train.output_dir": out, "tracking.uri": f"sqlite:///{tracking}", "tracking.system_metrics": "false"}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _mount(mnt: Path, size: int, remount: bool = False) -> None:
    opts = f"remount,size={size}" if remount else f"size={size}"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"this test needs to mount a small tmpfs (root): {r.stderr}"


def _used(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_full_disk_fails_clearly_and_resumes_after_room_is_made(tmp_path):
    home = tmp_path
    with tempfile.TemporaryDirectory() as mnt_dir:
        mnt = Path(mnt_dir)
        _mount(mnt, 1 << 30)
        try:
            # The first attempt's checkpoint of step 4 waits 6 s before writing (cluster.env): the disk fills
            # up meanwhile, once step 2's checkpoint is published.
            hold = "{LMFORGE_INJECT_SLOW_CHECKPOINT: '4:6:0'}"
            r = launcher("submit", str(LOCAL), "--name", "full", "--detach",
                         *_args(mnt, home / "mlflow.db", 6), "--set", f"cluster.env={hold}", home=home)
            assert r.returncode == 0, r.stderr[-4000:]
            st = _wait(home, lambda s: (s.get("last_checkpoint") or "").endswith("step_2"), "step 2's checkpoint")
            assert st["state"] == "RUNNING", st
            one = _used(mnt / "full" / "checkpoints" / "step_2")
            # Room for what is there now and half a checkpoint more: the next one cannot be written.
            _mount(mnt, _used(mnt) + one // 2, remount=True)
            st = _wait(home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), "the job's end")
            st = status("full", home)
            assert st["state"] == "FAILED", st
            assert "step_4 was not written" in st["error"] and "No space left on device" in st["error"], st["error"]
            assert "fault.checkpoint_errors=fail" in st["error"]
            assert st["last_checkpoint"].endswith("step_2")
            assert sorted(p.name for p in (mnt / "full" / "checkpoints").glob("*step_*")) == ["step_2"]
            _mount(mnt, 1 << 30, remount=True)  # the operator makes room
            r = launcher("resume", "full", *_args(mnt, home / "mlflow.db", 6), home=home)
            assert r.returncode == 0, r.stderr[-4000:]
            st = status("full", home)
            assert st["state"] == "SUCCEEDED" and st["step"] == 6 and st["last_checkpoint"].endswith("step_6"), st
            log = (mnt / "full" / "logs" / "rank0.log").read_text()
            assert f"resumed from {mnt / 'full' / 'checkpoints' / 'step_2'} at step 2" in log
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _wait(home: Path, until, what: str, timeout_s: float = 300) -> dict:
    return wait_for_status("full", home, until, what, timeout_s)
