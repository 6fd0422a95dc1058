"""Fault tolerance through the real CLI and a real local Ray cluster: processes are killed or frozen
by pid from outside the job, exactly as an operator (or a crash) would."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher.jobs import read_json, read_jsonl
from parallel.safe_load import safe_torch_load
from test_launcher_e2e import LOCAL, launcher, poll_status, status

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, HANG_TIMEOUT_S = 30, 5, 30


def _sets(home: Path, **extra) -> list[str]:
    values = {"train.steps": STEPS, "train.eval_every": 0, "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep_checkpoints": 3,
              "train.output_dir": home / "runs", "tracking.system_metrics": "false", **extra}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _final_params(home: Path, name: str) -> dict[str, torch.Tensor]:
    ckpt = home / "runs" / name / "checkpoints" / f"step_{STEPS}"
    states = ckpt / "mp_rank_00_model_states.pt"
    return safe_torch_load(states, map_location="cpu")["module"]


def _losses(home: Path, name: str) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    st = poll_status(name, home)  # only to find the MLflow run
    out: dict[int, list[float]] = {}
    for m in MlflowClient(st["mlflow"]["tracking_uri"]).get_metric_history(st["mlflow"]["run_id"], "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _wait(name: str, home: Path, until, timeout_s: float = 300) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = poll_status(name, home)
        if until(st):
            return st
        time.sleep(0.5)
    pytest.fail(f"timed out waiting on {name}: {st}")


def _reports(home: Path, name: str) -> list[dict]:
    """The ranks' own heartbeat files (workers/rank<R>.json): rank, pid, step, heartbeat time, attempt."""
    return [r for r in (read_json(p) for p in sorted((home / "runs" / name / "workers").glob("rank*.json"))) if r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    home = tmp_path_factory.mktemp("fault-ref")
    r = launcher("submit", str(LOCAL), "--name", "ref", *_sets(home), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    # Read now: test_corrupt_newest_checkpoint_falls_back_to_previous later continues this job.
    return {"home": home, "params": _final_params(home, "ref"), "losses": _losses(home, "ref")}


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """One job, two faults, from outside the job as an operator (or a crash) would: rank 1 is frozen
    (SIGSTOP) until the watchdog kills it (fault.hang_timeout_s); then, in the worker group that took over,
    a random rank is killed (SIGKILL) at a random step. The hang test and the bitwise-resume test both read it."""
    home = tmp_path_factory.mktemp("fault-victim")
    r = launcher("submit", str(LOCAL), "--name", "victim", "--detach", *_sets(home, **{"fault.hang_timeout_s": HANG_TIMEOUT_S}),
                 home=home)
    assert r.returncode == 0, r.stderr

    st = _wait("victim", home, lambda s: s["state"] == "RUNNING" and s["step"] >= 6)
    frozen = st["workers"][1]
    os.kill(frozen["pid"], signal.SIGSTOP)
    frozen_at = time.time()
    try:
        while psutil.Process(frozen["pid"]).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        # A stopped process writes nothing more: this is the last heartbeat the watchdog can judge it by.
        last = next(rep for rep in _reports(home, "victim") if rep["rank"] == frozen["rank"])
        hung = _wait("victim", home, lambda s: s["restarts"] >= 1 or s["state"] == "RESTARTING", timeout_s=HANG_TIMEOUT_S + 60)
    finally:
        try:
            os.kill(frozen["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass

    # The crash: a rank of the new worker group (attempt >= 1), once that group has trained past a random step.
    kill_at = random.Random().randint(min(max(7, hung["step"] + 2), STEPS - 6), STEPS - 6)

    def new_group_at_kill_step(reports: list[dict]) -> bool:
        return (len(reports) == 2 and all(rep.get("attempt", 0) >= 1 and rep["pid"] != frozen["pid"] for rep in reports)
                and min(rep["step"] for rep in reports) >= kill_at)

    deadline = time.time() + 300
    while not new_group_at_kill_step(reports := _reports(home, "victim")):
        assert time.time() < deadline, f"the new worker group never reached step {kill_at}: {reports}"
        time.sleep(0.5)
    crashed = random.Random(kill_at).choice(reports)
    print(f"froze rank {frozen['rank']} pid {frozen['pid']} at step {st['step']}; "
          f"killing rank {crashed['rank']} pid {crashed['pid']} at step {crashed['step']}")
    os.kill(crashed["pid"], signal.SIGKILL)
    final = _wait("victim", home, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s=600)
    return {"home": home, "frozen": frozen, "frozen_at": frozen_at, "last_heartbeat": last, "crashed": crashed,
            "final": final, "status": status("victim", home)}


def test_sigkill_restarts_and_resumes_bitwise(reference, faulted):
    home, victim = faulted["home"], faulted["crashed"]
    final = faulted["status"]
    # two faults, two restarts: the hang's and the crash's
    assert final["state"] == "SUCCEEDED" and final["restarts"] >= 2 and final["step"] == STEPS, final
    assert victim["pid"] not in {w["pid"] for w in final["workers"]}  # a new worker group did the rest
    rank0 = (home / "runs" / "victim" / "logs" / "rank0.log").read_text()
    assert "restart 1 of this run: waiting 1.0 s before resuming" in rank0  # fault.restart_backoff_s, doubling
    assert "restart 2 of this run: waiting 2.0 s before resuming" in rank0

    got = _final_params(home, "victim")
    assert got.keys() == reference["params"].keys()
    for k, v in reference["params"].items():
        assert torch.equal(got[k], v), f"{k} differs after restart"
    losses = _losses(home, "victim")
    assert sorted(losses) == list(range(STEPS))
    for step, values in losses.items():  # steps re-run after the restart were logged again: all must agree
        assert all(v == reference["losses"][step][0] for v in values), (step, values, reference["losses"][step])


def test_sigstop_hang_is_detected_and_recovered(faulted):
    """Judged by the system's own clocks, not by when this test happened to poll: the victim's last
    heartbeat (its report file) and the time the driver's watchdog killed it (`hangs.jsonl`)."""
    home, victim, last = faulted["home"], faulted["frozen"], faulted["last_heartbeat"]
    timeout = HANG_TIMEOUT_S
    assert last["pid"] == victim["pid"]
    kills = [k for k in read_jsonl(home / "runs" / "victim" / "hangs.jsonl") if k["pid"] == victim["pid"]]
    assert len(kills) == 1, kills
    kill = kills[0]
    assert kill["heartbeat"] == last["heartbeat"] and kill["hang_timeout_s"] == timeout, (kill, last)
    silent = kill["killed_at"] - last["heartbeat"]
    # The watchdog looks every poll_s: a rank silent past the timeout is killed at the next look (one poll_s),
    # and one poll_s more is the margin for a look delayed by a loaded machine.
    assert kill["poll_s"] <= timeout / 10, kill
    assert timeout < silent <= timeout + 2 * kill["poll_s"], f"killed {silent:.1f} s after its last heartbeat (hang_timeout_s={timeout})"
    assert kill["killed_at"] >= faulted["frozen_at"]  # the hang it caught is the one made here
    final = faulted["status"]
    assert final["state"] == "SUCCEEDED" and final["step"] == STEPS and final["restarts"] >= 1, final
    assert victim["pid"] not in {w["pid"] for w in final["workers"]}
    log = (home / "runs" / "victim" / "logs" / "driver.log").read_text()
    assert f"pid {victim['pid']}" in log and "no heartbeat" in log


def test_corrupt_newest_checkpoint_falls_back_to_previous(reference):
    """Continues the reference job (its params and losses were read when it ended): its newest checkpoint
    is torn, and a resume falls back to the one before."""
    home = reference["home"]
    ckpts = home / "runs" / "ref" / "checkpoints"
    newest, previous = ckpts / f"step_{STEPS}", ckpts / f"step_{STEPS - CHECKPOINT_EVERY}"
    assert previous.is_dir()  # train.keep_checkpoints=3
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    r = launcher("resume", "ref", "--set", f"train.steps={STEPS + 5}", home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    rank0 = (home / "runs" / "ref" / "logs" / "rank0.log").read_text()
    assert f"skipping checkpoint {newest}" in rank0 and "size mismatch" in rank0
    assert f"resumed from {previous} at step {STEPS - CHECKPOINT_EVERY}" in rank0
    assert status("ref", home)["step"] == STEPS + 5
    assert sorted(_losses(home, "ref")) == list(range(STEPS + 5))


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
        first, last = (safe_torch_load(ckpts / f"step_{s}" / "mp_rank_00_model_states.pt")["module"]
                       for s in (2, steps))
        assert all(torch.equal(first[k], v) for k, v in last.items())


def test_a_shard_a_rank_finds_damaged_ends_the_job_without_a_restart(tmp_path):
    """Checksums left to the ranks (data.verify_upfront_mb=0): the rank that opens a bit-flipped shard records
    the cause, Ray Train's next attempt ends before it builds anything, and the job is FAILED with the shard
    named and no restart counted (the damage cannot heal)."""
    import shutil

    from launcher.orchestrator import resolve_shards
    from launcher.spec import load_spec

    shards = tmp_path / "shards"
    shutil.copytree(resolve_shards(load_spec(LOCAL)), shards)
    damaged = sorted(shards.glob("train-*.tar"))
    for shard in damaged:  # every train shard: whichever the stream opens first is damaged
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
    r = launcher("submit", str(LOCAL), "--name", "rot", *_sets(tmp_path, **{
        "data.shards": shards, "data.corpus": "null", "data.verify_upfront_mb": 0}), home=tmp_path)
    st = status("rot", tmp_path)
    assert r.returncode != 0 and st["state"] == "FAILED" and st["restarts"] == 0, st
    assert st["error"].startswith("corrupt shard ") and "sha256 differs" in st["error"], st["error"]
    assert any(str(p) in st["error"] for p in damaged), st["error"]
    assert "\n" not in st["error"] and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == f"job rot: FAILED at step 0 — {st['error']}"
    attempts = read_json(tmp_path / "runs" / "rot" / "attempts.json")
    assert attempts["attempts"] == 1, attempts  # the group Ray Train started again did not count an attempt
