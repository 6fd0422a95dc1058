"""Validation against a real multi-node Ray cluster on this machine (the `two_nodes` fixture: a head with no
CPUs and two worker raylets, each declaring 2 logical CPUs and 2 GPUs). The GPUs are declared, not real
(Ray schedules by them; nothing here runs CUDA), which is what a CPU-only login node sees of a GPU cluster.
Specs are checked against the cluster's nodes, not the submitting host, before any worker starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ray_head

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"
GPU_NODE = ROOT / "cluster_configs" / "gpu_node.yaml"


def _submit(head: ray_head.RayHead, tmp_path: Path, config: Path, *sets: str, address: bool = True):
    env = {**os.environ, **head.env(), "LMFORGE_HOME": str(tmp_path / "home")}
    args = [sys.executable, "-m", "launcher.cli", "submit", str(config), "--name", "mn",
            "--set", f"train.output_dir={tmp_path / 'runs'}", *(a for s in sets for a in ("--set", s))]
    if address:
        args += ["--address", head.address]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


CHECK = """
import sys
import torch
from launcher.cluster import validate_on_cluster
from launcher.spec import load_spec
from launcher.validate import validate
assert not torch.cuda.is_available()  # no CUDA in this process: the cluster's nodes decide
spec = load_spec(sys.argv[1], sys.argv[3:])
validate(spec, sys.argv[2])
validate_on_cluster(spec, sys.argv[2])
print("valid")
"""


def test_a_gpu_spec_validates_against_declared_gpus_from_a_host_without_cuda(two_nodes):
    # gpu_node.yaml: 8 ranks × (8 CPUs + 1 GPU), shrunk to this cluster's 2 nodes × (2 CPUs, 2 GPUs) = 4 ranks.
    sets = ["cluster.workers=4", "cluster.cpus_per_worker=1", "data.global_batch=16"]
    r = subprocess.run([sys.executable, "-c", CHECK, str(GPU_NODE), two_nodes.address, *sets], capture_output=True,
                       text=True, env={**os.environ, **two_nodes.env()}, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("valid"), r.stderr[-3000:]


def test_too_few_declared_gpus_are_refused_with_the_arithmetic(two_nodes, tmp_path):
    r = _submit(two_nodes, tmp_path, GPU_NODE, "cluster.cpus_per_worker=1")  # 8 ranks want 8 GPUs; 4 declared
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.workers: 8 workers × (1 CPU + 1 GPU) do not fit "
                                                   "the cluster: its nodes hold 2 + 2 = 4 ranks"), r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_tp_group_that_would_span_nodes_is_refused_before_start(two_nodes, tmp_path):
    # 4 CPU ranks on nodes of 2 CPUs: 2 ranks a node, so a tp4 group cannot sit on one.
    r = _submit(two_nodes, tmp_path, LOCAL, "cluster.workers=4", "cluster.cpus_per_worker=1", "cluster.device=cpu",
                "parallel.tp=4")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parallel.tp: tp=4 keeps each TP group's 4 ranks on one "
                                                   "node, but the nodes hold 2, 2 ranks"), r.stderr
    assert "0 + 0 = 0 TP groups fit, the job has 4 / 4 = 1" in lines[0]


def test_the_spec_address_is_the_one_used_when_no_flag_is_given(two_nodes, tmp_path):
    """`cluster.address` alone reaches the cluster (validation runs against its nodes, so the same tp4
    refusal), where it used to be ignored and a local cluster started."""
    r = _submit(two_nodes, tmp_path, LOCAL, f"cluster.address={two_nodes.address}", "cluster.workers=4",
                "cluster.cpus_per_worker=1", "cluster.device=cpu", "parallel.tp=4", address=False)
    assert r.returncode == 2 and "error: parallel.tp: tp=4 keeps each TP group" in r.stderr, r.stderr


def test_strict_placements_the_nodes_cannot_give_are_refused_before_start(two_nodes, tmp_path):
    base = ("cluster.workers=4", "cluster.cpus_per_worker=1", "cluster.device=cpu", "data.global_batch=32")
    r = _submit(two_nodes, tmp_path, LOCAL, *base, "cluster.placement=strict_pack")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: cluster.placement: strict_pack puts all 4 ranks of (1 CPU) on one node, but the most one node "
        "holds is 2; allowed here: pack, spread"), r.stderr
    r = _submit(two_nodes, tmp_path, LOCAL, *base, "cluster.placement=strict_spread")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: cluster.placement: strict_spread puts each of the 4 ranks on a node of its own, but 2 nodes can "
        "hold a rank of (1 CPU); allowed here: pack, spread"), r.stderr


HOLD = """
import sys, time
import ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False, include_dashboard=False)
pg = placement_group([{"CPU": 2, "node_a": 1}])
ray.get(pg.ready(), timeout=120)
print("holding", flush=True)
time.sleep(600)
"""


def test_resources_that_never_come_free_end_the_job_after_the_placement_timeout(two_nodes, tmp_path):
    """Another driver holds node_a's CPUs: the cluster has the job's 4 CPUs (validation passes) but never
    frees them; the job fails with one line after cluster.placement_timeout_s, not a wait for ever."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, two_nodes.address], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **two_nodes.env()})
    try:
        assert holder.stdout.readline().strip() == "holding"
        r = _submit(two_nodes, tmp_path, LOCAL, "cluster.workers=4", "cluster.cpus_per_worker=1", "cluster.device=cpu",
                    "cluster.placement_timeout_s=5", "train.steps=2", "data.global_batch=32",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0, r.stdout[-2000:]
    state = __import__("json").loads((tmp_path / "runs" / "mn" / "state.json").read_text())
    assert state["state"] == "FAILED", state
    assert state["error"].startswith("cluster.placement_timeout_s: the resources of 4 workers × 1 CPU (pack) "
                                     "were not free within 5 s"), state["error"]


def test_every_rank_gets_the_flight_recorder_and_cluster_env_wins(tmp_path):
    from launcher.cluster import worker_env
    from launcher.spec import load_spec

    env = worker_env(load_spec(LOCAL), tmp_path)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight_recorder" / "rank_")
    assert (tmp_path / "flight_recorder").is_dir()
    mine = worker_env(load_spec(LOCAL, ["cluster.env={TORCH_NCCL_TRACE_BUFFER_SIZE: 64, NCCL_SOCKET_IFNAME: ib0}"]), tmp_path)
    assert mine["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "64" and mine["NCCL_SOCKET_IFNAME"] == "ib0"


@pytest.mark.parametrize("global_batch,left_cpus,expect", [(16, 1, 1), (48, 3, 3), (32, 3, 2), (16, 0, 0)])
def test_elastic_worker_count_is_the_largest_valid_layout_the_nodes_hold(global_batch, left_cpus, expect):
    """After a node loss: the most DP ranks (<= the spec's 4) that fit the nodes left and divide the global
    batch into whole micro-batches (micro_batch 8)."""
    from launcher.cluster import Node
    from launcher.node_watch import elastic_workers
    from launcher.spec import load_spec

    spec = load_spec(LOCAL, ["cluster.workers=4", "cluster.device=cpu", f"data.global_batch={global_batch}"])
    nodes = [Node("a", "10.0.0.1", float(left_cpus), 0.0)] if left_cpus else []
    assert elastic_workers(spec, nodes) == expect
