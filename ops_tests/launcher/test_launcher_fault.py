"""Fault tolerance through the real CLI and real Ray clusters: processes are killed or frozen by pid from
outside the job, exactly as an operator (or a crash) would.

The hang and crash tests run a 4-rank tp2×dp2 job over the two worker nodes of a real multi-node cluster
(`two_nodes`: a head with no CPUs, two raylets of 2 CPUs): each TP group on one node, every rank on a node
that is not the head (and not the driver's), so the watchdog's kill goes through that node's agent."""
from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher.jobs import read_json, read_jsonl
from parallel.safe_load import safe_torch_load
from test_launcher_e2e import LOCAL, launcher, poll_status, status, wait_for_status

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY, HANG_TIMEOUT_S = 20, 5, 20
SLOW_CHECKPOINT_STEP, SLOW_CHECKPOINT_S = 5, HANG_TIMEOUT_S + 5
TP2_DP2 = {"cluster.workers": 4, "cluster.cpus_per_worker": 1, "cluster.device": "cpu", "parallel.tp": 2,
           "cluster.placement": "pack"}


def _sets(home: Path, **extra) -> list[str]:
    values = {"train.steps": STEPS, "train.eval_every": 0, "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep_checkpoints": 3,
              "train.output_dir": home / "runs", "tracking.system_metrics": "false", **extra}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _node_names(cluster) -> dict[str, str]:
    """Ray node id -> the custom resource the node declares (`node_a`, `node_b`); the head has none."""
    return {n["NodeID"]: next((r for r in n["Resources"] if r.startswith("node_")), "head")
            for n in cluster.node_table() if n["Alive"]}


def _final_params(home: Path, name: str) -> dict[str, torch.Tensor]:
    """Every TP shard's parameters from the last checkpoint, keyed `mp_rank_NN/name`."""
    ckpt = home / "runs" / name / "checkpoints" / f"step_{STEPS}"
    out = {}
    for states in sorted(ckpt.glob("mp_rank_*_model_states.pt")):
        for k, v in safe_torch_load(states, map_location="cpu")["module"].items():
            out[f"{states.name[:10]}/{k}"] = v
    return out


def _history(home: Path, name: str, key: str):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    st = poll_status(name, home)  # only to find the MLflow run (the job's server is gone: its store)
    return MlflowClient(st["mlflow"]["tracking_uri"]).get_metric_history(st["mlflow"]["run_id"], key)


def _losses(home: Path, name: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in _history(home, name, "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _wait(name: str, home: Path, until, timeout_s: float = 300) -> dict:
    return wait_for_status(name, home, until, name, timeout_s, poll_s=0.5)


def _reports(home: Path, name: str) -> list[dict]:
    """The ranks' own heartbeat files (workers/rank<R>.json): rank, pid, step, heartbeat time, attempt."""
    return [r for r in (read_json(p) for p in sorted((home / "runs" / name / "workers").glob("rank*.json"))) if r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, two_nodes):
    home = tmp_path_factory.mktemp("fault-ref")
    r = launcher("submit", str(LOCAL), "--name", "ref", *_sets(home, **TP2_DP2), home=home, cluster=two_nodes)
    assert r.returncode == 0, r.stderr[-4000:]
    # Read now: test_corrupt_newest_checkpoint_falls_back_to_previous later continues this job.
    return {"home": home, "params": _final_params(home, "ref"), "losses": _losses(home, "ref"),
            "status": status("ref", home), "nodes": _node_names(two_nodes)}


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, two_nodes):
    """One job, three faults, from outside the job as an operator (or a crash) would: the checkpoint of step 5
    is slowed past fault.hang_timeout_s (on every rank, injected through cluster.env); then a rank of node_b is
    frozen (SIGSTOP) until the watchdog has it killed (fault.hang_timeout_s); then, in the worker group that took
    over, a random rank is killed (SIGKILL) at a random step. The hang test and the bitwise-resume test both read it."""
    home = tmp_path_factory.mktemp("fault-victim")
    slow = f"{{LMFORGE_INJECT_SLOW_CHECKPOINT: '{SLOW_CHECKPOINT_STEP}:{SLOW_CHECKPOINT_S}'}}"
    r = launcher("submit", str(LOCAL), "--name", "victim", "--detach",
                 *_sets(home, **TP2_DP2, **{"fault.hang_timeout_s": HANG_TIMEOUT_S, "cluster.env": slow}),
                 home=home, cluster=two_nodes)
    assert r.returncode == 0, r.stderr

    # The job's MLflow server (it spans nodes) is killed, and killed again each time it comes back, until rank 0
    # has failed to send its metrics once (the flush before the checkpoint of step 5); then it is left to recover.
    st = _wait("victim", home, lambda s: s["state"] == "RUNNING" and s["step"] >= 2)
    server_kills = _keep_killing_the_server(st["mlflow"]["server"], home / "runs" / "victim" / "logs" / "rank0.log")
    st = _wait("victim", home, lambda s: s["state"] == "RUNNING" and s["step"] >= SLOW_CHECKPOINT_STEP + 1)
    node_b = two_nodes.node_with("node_b")["NodeID"]
    frozen = next(w for w in st["workers"] if w["node"] == node_b)
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
        return (len(reports) == 4 and all(rep.get("attempt", 0) >= 1 and rep["pid"] != frozen["pid"] for rep in reports)
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
            "final": final, "status": status("victim", home), "node_b": node_b, "server_kills": server_kills}


def _server_processes(uri: str) -> list[psutil.Process]:
    port = uri.rsplit(":", 1)[1]
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(a.endswith("mlflow") for a in cmd[:2]) and "server" in cmd and port in cmd:
            found.append(p)
    return found


def _keep_killing_the_server(uri: str, rank0_log: Path, timeout_s: float = 120) -> int:
    """Kills the server's process group whenever it is up, until rank 0 logs a failed flush; returns the kills."""
    kills, deadline = 0, time.time() + timeout_s
    while not (rank0_log.is_file() and "unreachable" in rank0_log.read_text()):
        assert time.time() < deadline, "rank 0 never tried to reach the killed MLflow server"
        for p in _server_processes(uri):
            try:
                os.killpg(p.pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return kills


def test_a_tp2_dp2_job_runs_over_two_nodes_with_each_tp_group_on_one(reference):
    final, names = reference["status"], reference["nodes"]
    assert final["state"] == "SUCCEEDED" and final["step"] == STEPS and final["restarts"] == 0, final
    where = {w["rank"]: names[w["node"]] for w in final["workers"]}
    assert sorted(where) == [0, 1, 2, 3]
    assert where[0] == where[1] and where[2] == where[3], where  # TP groups: ranks (0, 1) and (2, 3)
    assert {where[0], where[2]} == {"node_a", "node_b"}, where  # one TP group a node, none on the head
    # It spans nodes and sets no tracking.uri: it tracked through its own MLflow server on the head node, bound
    # to the head's cluster address (not loopback: the other nodes reach it), over a store in the job directory.
    ml = final["mlflow"]
    job_dir = reference["home"] / "runs" / "ref"
    assert ml["server"].startswith("http://") and "127.0.0.1" not in ml["server"], ml
    assert ml["store"] == ml["tracking_uri"] == f"sqlite:///{(job_dir / 'tracking' / 'mlflow.db').resolve()}", ml
    assert sorted(reference["losses"]) == list(range(STEPS))
    assert not _server_processes(ml["server"])  # stopped with the job


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
    assert sorted(losses) == list(range(STEPS))  # every step's loss, though the server was down for some
    assert faulted["server_kills"] >= 1
    assert _history(home, "victim", "tracking_errors")  # the failed flushes, reported once they got through
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
    assert kill["killed_on"] == faulted["node_b"]  # by the agent on the rank's own node
    # The only kill is the frozen rank's: the checkpoint slowed past the timeout beat all along.
    assert len(read_jsonl(home / "runs" / "victim" / "hangs.jsonl")) == 1
    rank0 = (home / "runs" / "victim" / "logs" / "rank0.log").read_text()
    took = float(re.search(rf"checkpoint \S+/step_{SLOW_CHECKPOINT_STEP} in ([\d.]+) s", rank0).group(1))
    assert took > timeout, f"the slowed checkpoint took {took} s, not more than hang_timeout_s={timeout}"
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
    is torn, and a resume falls back to the one before. The resume runs on the one-node shared cluster, and
    tracks into the same MLflow run, in the store the job's server kept in its directory."""
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
    assert status("ref", home)["mlflow"]["tracking_uri"] == reference["status"]["mlflow"]["store"]


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
