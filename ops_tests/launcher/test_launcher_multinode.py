"""Validation against a real multi-node Ray cluster on this machine: a head with no CPUs and two worker
raylets (`ray start --address`), each declaring 4 logical CPUs and 2 GPUs. The GPUs are declared, not real
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


@pytest.fixture(scope="module")
def two_nodes():
    head = ray_head.RayHead(num_cpus=0, single_machine=False)
    head.start()
    try:
        for _ in range(2):
            head.add_node(num_cpus=4, num_gpus=2)
        yield head
    finally:
        head.stop()


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
    # gpu_node.yaml: 8 ranks × (8 CPUs + 1 GPU), shrunk to this cluster's 2 nodes × (4 CPUs, 2 GPUs) = 4 ranks.
    sets = ["cluster.workers=4", "cluster.cpus_per_worker=2", "data.global_batch=16"]
    r = subprocess.run([sys.executable, "-c", CHECK, str(GPU_NODE), two_nodes.address, *sets], capture_output=True,
                       text=True, env={**os.environ, **two_nodes.env()}, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("valid"), r.stderr[-3000:]


def test_too_few_declared_gpus_are_refused_with_the_arithmetic(two_nodes, tmp_path):
    r = _submit(two_nodes, tmp_path, GPU_NODE, "cluster.cpus_per_worker=2")  # 8 ranks want 8 GPUs; 4 declared
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.workers: 8 workers × (2 CPU + 1 GPU) do not fit "
                                                   "the cluster: its nodes hold 2 + 2 = 4 ranks"), r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_tp_group_that_would_span_nodes_is_refused_before_start(two_nodes, tmp_path):
    # 4 CPU ranks on nodes of 4 CPUs... at 2 CPUs a rank: 2 ranks a node, so a tp4 group cannot sit on one.
    r = _submit(two_nodes, tmp_path, LOCAL, "cluster.workers=4", "cluster.cpus_per_worker=2", "cluster.device=cpu",
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
                "cluster.cpus_per_worker=2", "cluster.device=cpu", "parallel.tp=4", address=False)
    assert r.returncode == 2 and "error: parallel.tp: tp=4 keeps each TP group" in r.stderr, r.stderr
