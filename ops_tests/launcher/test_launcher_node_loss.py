"""Losing a node mid-run, on a real multi-node Ray cluster on this machine: a head with no CPUs and worker
raylets of 1 CPU each (one rank a node), each with its own custom resource. A node is ended as a machine loss
would end it: its raylet and everything under it SIGKILLed. The head's health checks are quick (1 s, 3
misses) so the cluster notices in seconds, as a real one would in tens of seconds.

With `fault.elastic: true` the job resumes on the node left with fewer DP ranks; with `false` it waits, and
resumes when a node joins again. Either way the samples it trained on, recorded by the ranks, are exactly
the uninterrupted run's."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import ray_head
from test_launcher_e2e import LOCAL, launcher, poll_status, status, wait_for_status

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY = 9, 3
# The node is ended once both ranks are past the first checkpoint; the first attempt's second checkpoint is
# slowed (every rank, through cluster.env) so the loss always lands mid-run, however fast the steps go.
HOLD = f"{{LMFORGE_INJECT_SLOW_CHECKPOINT: '{2 * CHECKPOINT_EVERY}:45:0'}}"


@pytest.fixture(scope="module")
def cluster():
    head = ray_head.RayHead(num_cpus=0, single_machine=False, system_env={
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"})
    head.start()
    try:
        for name in ("node_a", "node_b"):
            head.add_node(num_cpus=1, resources={name: 1})
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def uninterrupted() -> dict[int, list[int]]:
    """step -> the global sample ids of an uninterrupted run: the stream's own schedule (no I/O)."""
    from data_pipeline import TokenStream
    from launcher.orchestrator import resolve_shards
    from launcher.spec import load_spec

    spec = load_spec(LOCAL)
    d = spec.data
    stream = TokenStream(resolve_shards(spec), seed=spec.train.seed, global_batch=d.global_batch,
                         micro_batch=d.micro_batch, dp_rank=0, dp_size=1)
    return {step: ids.tolist() for step, ids in enumerate(stream.samples_for_steps(STEPS))}


def _submit(home: Path, cluster: ray_head.RayHead, elastic: bool, **extra) -> None:
    values = {"train.steps": STEPS, "train.eval_every": 0, "train.checkpoint_every": CHECKPOINT_EVERY,
              "cluster.workers": 2, "cluster.device": "cpu", "data.record_samples": "true",
              "fault.elastic": str(elastic).lower(), "fault.node_wait_s": 300, "fault.hang_timeout_s": 60,
              "cluster.env": HOLD,
              "train.output_dir": home / "runs", "tracking.system_metrics": "false", **extra}
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    r = launcher("submit", str(LOCAL), "--name", "loss", "--detach", *sets, home=home, cluster=cluster)
    assert r.returncode == 0, r.stderr[-3000:]


def _wait(home: Path, until, what: str, timeout_s: float = 300) -> dict:
    return wait_for_status("loss", home, until, what, timeout_s)


def _lose_a_node_mid_run(home: Path, cluster: ray_head.RayHead) -> dict:
    """Waits for a checkpoint and a step past it, then ends the node running rank 1; returns that node."""
    st = _wait(home, lambda s: s["state"] == "RUNNING" and len(s["workers"]) == 2
               and min(w["step"] for w in s["workers"]) >= CHECKPOINT_EVERY + 1, "two ranks past a checkpoint")
    victim = next(n for n in cluster.node_table() if n["NodeID"] == st["workers"][1]["node"])
    cluster.stop_node(victim)
    return victim


def _consumed(home: Path) -> dict[int, list[int]]:
    """step -> the sample ids the newest attempt that trained that step used (all its ranks): steps trained
    again after a restart count once, from the attempt that went on."""
    newest: dict[int, tuple[int, list[int]]] = {}
    for f in sorted((home / "runs" / "loss" / "workers").glob("samples_rank*.jsonl")):
        for rec in map(json.loads, f.read_text().splitlines()):
            attempt, ids = newest.get(rec["step"], (-1, []))
            if rec["attempt"] > attempt:
                newest[rec["step"]] = (rec["attempt"], list(rec["ids"]))
            elif rec["attempt"] == attempt:
                ids.extend(rec["ids"])
    return {step: ids for step, (_, ids) in newest.items()}


def _assert_same_samples(home: Path, uninterrupted: dict[int, list[int]]) -> None:
    got = _consumed(home)
    assert sorted(got) == list(range(STEPS))
    for step, ids in uninterrupted.items():
        assert sorted(got[step]) == sorted(ids), f"step {step} trained on other samples than the uninterrupted run"


def test_elastic_job_resumes_on_the_node_left_with_fewer_dp_ranks(cluster, uninterrupted, tmp_path):
    _submit(tmp_path, cluster, elastic=True)
    lost = _lose_a_node_mid_run(tmp_path, cluster)
    final = _wait(tmp_path, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), "the job's end")
    st = status("loss", tmp_path)
    assert final["state"] == "SUCCEEDED" and st["step"] == STEPS, st
    assert st["resumed_on"]["workers"] == 1 and st["resumed_on"]["lost"] == [lost["NodeID"]], st
    assert len(st["workers"]) == 1 and st["workers"][0]["node"] != lost["NodeID"], st
    rank0 = (tmp_path / "runs" / "loss" / "logs" / "rank0.log").read_text()
    assert "written with tp=1 pp=1 dp=2; loading its consolidated state into tp=1 pp=1 dp=1" in rank0
    _assert_same_samples(tmp_path, uninterrupted)


def test_a_job_that_is_not_elastic_waits_for_a_node_and_resumes_when_one_joins(cluster, uninterrupted, tmp_path):
    cluster.add_node(num_cpus=1, resources={"node_c": 1})  # two nodes again (the first test ended one)
    # Tracking to a file (the elastic test's job has the server a multi-node job gets): one start-up less.
    _submit(tmp_path, cluster, elastic=False, **{"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    lost = _lose_a_node_mid_run(tmp_path, cluster)
    waiting = _wait(tmp_path, lambda s: s.get("waiting") is not None, "the job to wait for capacity", timeout_s=120)
    assert waiting["state"] == "RESTARTING", waiting
    assert waiting["waiting"]["for"] == "2 workers (fault.elastic=false)", waiting
    assert lost["NodeID"] in waiting["waiting"]["reason"] and waiting["waiting"]["until"] > time.time(), waiting
    time.sleep(3)
    assert poll_status("loss", tmp_path)["waiting"] is not None  # still waiting: one node cannot hold 2 ranks
    cluster.add_node(num_cpus=1, resources={"node_d": 1})
    final = _wait(tmp_path, lambda s: s["state"] in ("SUCCEEDED", "FAILED", "STOPPED"), "the job's end")
    st = status("loss", tmp_path)
    assert final["state"] == "SUCCEEDED" and st["step"] == STEPS and st["waiting"] is None, st
    assert st["resumed_on"]["workers"] == 2 and len(st["workers"]) == 2, st
    assert lost["NodeID"] not in {w["node"] for w in st["workers"]}
    _assert_same_samples(tmp_path, uninterrupted)
