"""Fault tolerance through the real CLI and a real local Ray cluster: processes are killed or frozen
by pid from outside the job, exactly as an operator (or a crash) would."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from test_launcher_e2e import LOCAL, launcher, status

pytestmark = pytest.mark.slow
STEPS = 30


def _sets(home: Path, **extra) -> list[str]:
    values = {"train.steps": STEPS, "train.eval_every": 0, "train.checkpoint_every": 5, "train.keep_checkpoints": 3,
              "train.output_dir": home / "runs", "tracking.system_metrics": "false", **extra}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _final_params(home: Path, name: str) -> dict[str, torch.Tensor]:
    ckpt = home / "runs" / name / "checkpoints" / f"step_{STEPS}"
    states = ckpt / "mp_rank_00_model_states.pt"
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def _losses(home: Path, name: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    st = status(name, home)
    out: dict[int, list[float]] = {}
    for m in MlflowClient(st["mlflow"]["tracking_uri"]).get_metric_history(st["mlflow"]["run_id"], "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _wait(name: str, home: Path, until, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = status(name, home)
        if until(st):
            return st
        time.sleep(0.5)
    pytest.fail(f"timed out waiting on {name}: {st}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    home = tmp_path_factory.mktemp("fault-ref")
    r = launcher("submit", str(LOCAL), "--name", "ref", *_sets(home), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"params": _final_params(home, "ref"), "losses": _losses(home, "ref")}


def test_sigkill_restarts_and_resumes_bitwise(reference, tmp_path):
    home = tmp_path
    kill_at = random.Random().randint(7, 22)
    r = launcher("submit", str(LOCAL), "--name", "victim", "--detach", *_sets(home), home=home)
    assert r.returncode == 0, r.stderr
    st = _wait("victim", home, lambda s: s["state"] == "RUNNING" and s["step"] >= kill_at)
    victim = random.Random(kill_at).choice(st["workers"])
    print(f"killing rank {victim['rank']} pid {victim['pid']} at step {st['step']}")
    os.kill(victim["pid"], signal.SIGKILL)
    final = _wait("victim", home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=600)
    assert final["state"] == "SUCCEEDED" and final["restarts"] >= 1 and final["step"] == STEPS, final
    assert victim["pid"] not in {w["pid"] for w in final["workers"]}  # a new worker group did the rest
    rank0 = (home / "runs" / "victim" / "logs" / "rank0.log").read_text()
    assert "restart 1 of this run: waiting 1.0 s before resuming" in rank0  # fault.restart_backoff_s, doubling

    got = _final_params(home, "victim")
    assert got.keys() == reference["params"].keys()
    for k, v in reference["params"].items():
        assert torch.equal(got[k], v), f"{k} differs after restart"
    losses = _losses(home, "victim")
    assert sorted(losses) == list(range(STEPS))
    for step, values in losses.items():  # steps re-run after the restart were logged again: all must agree
        assert all(v == reference["losses"][step][0] for v in values), (step, values, reference["losses"][step])


def test_sigstop_hang_is_detected_and_recovered(tmp_path):
    home = tmp_path
    timeout = 30
    r = launcher("submit", str(LOCAL), "--name", "frozen", "--detach", *_sets(home, **{"fault.hang_timeout_s": timeout}), home=home)
    assert r.returncode == 0, r.stderr
    st = _wait("frozen", home, lambda s: s["state"] == "RUNNING" and s["step"] >= 6)
    victim = st["workers"][1]
    os.kill(victim["pid"], signal.SIGSTOP)
    frozen_at = time.time()
    try:
        _wait("frozen", home, lambda s: s["restarts"] >= 1 or s["state"] == "RESTARTING", timeout_s=timeout + 60)
        detected = time.time() - frozen_at
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert detected <= timeout + 20, f"hang noticed after {detected:.0f} s (hang_timeout_s={timeout})"
    final = _wait("frozen", home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=600)
    assert final["state"] == "SUCCEEDED" and final["step"] == STEPS and final["restarts"] >= 1, final
    log = (home / "runs" / "frozen" / "logs" / "driver.log").read_text()
    assert f"pid {victim['pid']}" in log and "no heartbeat" in log


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    home = tmp_path
    r = launcher("submit", str(LOCAL), "--name", "torn", *_sets(home, **{"train.steps": 20, "train.checkpoint_every": 10}), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    newest = home / "runs" / "torn" / "checkpoints" / "step_20"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    r = launcher("resume", "torn", "--set", "train.steps=25", home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    rank0 = (home / "runs" / "torn" / "logs" / "rank0.log").read_text()
    assert f"skipping checkpoint {newest}" in rank0 and "size mismatch" in rank0
    assert f"resumed from {newest.parent / 'step_10'} at step 10" in rank0
    assert status("torn", home)["step"] == 25
    assert sorted(_losses(home, "torn")) == list(range(25))


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_nonfinite_loss_follows_the_policy(tmp_path, policy):
    """A model whose init overflows (init_std=1e30) gives non-finite gradients at every step: a real divergence."""
    from mlflow.tracking import MlflowClient

    home, steps = tmp_path, 6
    r = launcher("submit", str(LOCAL), "--name", "nan", *_sets(home, **{
        "train.steps": steps, "train.checkpoint_every": 2, "model.init_std": 1e30, "fault.nonfinite": policy}), home=home)
    st = status("nan", home)
    ckpts = home / "runs" / "nan" / "checkpoints"
    history = MlflowClient(st["mlflow"]["tracking_uri"]).get_metric_history(st["mlflow"]["run_id"], "nonfinite_steps")
    if policy == "stop":
        assert r.returncode != 0 and st["state"] == "FAILED" and st["restarts"] == 0, st  # a NaN is not retried
        assert "non-finite loss or gradient at step 0" in st["error"] and "fault.nonfinite=stop" in st["error"], st["error"]
        assert "non-finite" in r.stdout + r.stderr
        assert not list(ckpts.glob("step_*")), "a checkpoint was written from the bad state"
        assert [m.value for m in history] == [1]
    else:
        assert r.returncode == 0 and st["state"] == "SUCCEEDED" and st["step"] == steps, st
        assert sorted(m.value for m in history) == list(range(1, steps + 1))
        # every update was refused, so the checkpoints hold the initial weights
        first, last = (torch.load(ckpts / f"step_{s}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
                       for s in (2, steps))
        assert all(torch.equal(first[k], v) for k, v in last.items())
