"""Fixtures for launcher tests: one real Ray cluster for the whole run, and a small prepared shard directory
(real webdataset shards, real BPE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ray_head
from corpora import english_ish


@pytest.fixture(scope="session", autouse=True)
def shared_ray():
    """One real Ray cluster (`ray start --head` on 127.0.0.1, 8 logical CPUs: enough for the 4-worker jobs)
    for every end-to-end job of the run: `test_launcher_e2e.launcher()` passes its address to `submit` and
    `resume`. Started on first use, so tests that start no job pay nothing; ended, by its processes' pids,
    when the run ends."""
    head = ray_head.RayHead(num_cpus=8)
    ray_head.SESSION = head
    try:
        yield head
    finally:
        ray_head.SESSION = None
        head.stop()


@pytest.fixture(scope="session")
def two_nodes():
    """A real multi-node Ray cluster on this machine: a head with no CPUs (it runs the drivers' and Ray's own
    actors, never a rank) and two worker raylets (`ray start --address`), each declaring 2 logical CPUs, 2 GPUs
    and its own custom resource (`node_a`, `node_b`) so tests can tell which node a rank landed on. The GPUs
    are declared, not real: Ray schedules by them, nothing runs CUDA (CPU jobs set cluster.device=cpu)."""
    head = ray_head.RayHead(num_cpus=0, single_machine=False)
    head.start()
    try:
        for name in ("node_a", "node_b"):
            head.add_node(num_cpus=2, num_gpus=2, resources={name: 1})
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline import prepare

    corpus = tmp_path_factory.mktemp("launcher-corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(english_ish(rng, 1500))
    out = tmp_path_factory.mktemp("launcher-shards")
    prepare(str(corpus), out, vocab_size=512, seq_len=32, samples_per_shard=64, val_fraction=0.2)
    return out
