"""Where a job runs: one address, resolved once, and the spec checked against that cluster's nodes.

The address is `--address`, else `cluster.address`, else none: the embedded local cluster this process
starts. Validation and `ray.init` both use the resolved one. On a Ray cluster, what the spec needs is
compared with what the alive nodes declare (`ray.nodes()`), not with the submitting host: a CPU-only
login node submits a GPU job. Ranks are placed one per bundle, and Ray Train numbers them node by node, so
a TP group (tp consecutive ranks) sits on one node when every node holds a multiple of tp ranks: a layout
whose TP group cannot fit on any node is refused with the arithmetic.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import SpecError
from launcher.spec import JobSpec

log = logging.getLogger("lmforge." + __name__)

PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")


def resolve_address(flag: str | None, spec: JobSpec) -> str | None:
    """`--address` > `cluster.address` > None (the embedded local cluster)."""
    return flag or spec.cluster.address or None


def flight_recorder_env(job_dir: Path) -> dict[str, str]:
    """NCCL's flight recorder on (as torchtitan has it): each rank keeps its last collectives and dumps them
    to `<job>/flight_recorder/rank_<R>` when a collective times out, which a hang ends in. Unused by gloo."""
    (job_dir / "flight_recorder").mkdir(parents=True, exist_ok=True)
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(job_dir / "flight_recorder" / "rank_")}


def worker_env(spec: JobSpec, job_dir: Path | None = None) -> dict[str, str]:
    """The environment every rank gets through Ray's runtime_env: the flight recorder's settings (for a job),
    then `cluster.env` (NCCL_SOCKET_IFNAME, ...), which wins."""
    base = flight_recorder_env(job_dir) if job_dir is not None else {}
    return {**base, **{str(k): str(v) for k, v in (spec.cluster.env or {}).items()}}


def connect(spec: JobSpec, address: str | None, job_dir: Path | None = None) -> None:
    """ray.init: joins the cluster at `address`, or starts the embedded one on this host, bound to loopback.
    Either way every rank gets `worker_env` (and, embedded, the loopback interface for gloo and NCCL)."""
    import ray

    if ray.is_initialized():
        return
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    env = worker_env(spec, job_dir)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **quiet)
        return
    from ray._private import ray_constants

    from launcher.rendezvous import LOOPBACK_ENV

    # The embedded cluster is this host only: Ray would resolve 127.0.0.1 to the host's outside address (so
    # other nodes could join) unless told the cluster is single-machine; its servers then bind loopback.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # for the GCS, raylet and workers it starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when this process resolves its own address
    # A small box still runs every rank: declare as many logical CPUs as the workers need.
    need = spec.cluster.workers * spec.cluster.cpus_per_worker
    ray.init(num_cpus=max(os.cpu_count() or 1, need), _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {**LOOPBACK_ENV, **env}}, **quiet)


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    cpus: float
    gpus: float


def alive_nodes() -> list[Node]:
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0.0),
                 n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def per_rank(spec: JobSpec, gpu: bool) -> dict[str, float]:
    return {"CPU": float(spec.cluster.cpus_per_worker), **({"GPU": 1.0} if gpu else {})}


def wants_gpu(spec: JobSpec, nodes: list[Node]) -> bool:
    if spec.cluster.device != "auto":
        return spec.cluster.device == "cuda"
    return any(n.gpus >= 1 for n in nodes)


def ranks_on(node: Node, need: dict[str, float]) -> int:
    fits = [int(node.cpus // need["CPU"])] if need["CPU"] > 0 else []
    if "GPU" in need:
        fits.append(int(node.gpus // need["GPU"]))
    return min(fits) if fits else 0


def check_fits(spec: JobSpec, nodes: list[Node]) -> None:
    """SpecError with the arithmetic when the cluster's nodes cannot hold the job's ranks, or its TP groups
    (tp consecutive ranks) cannot each sit on one node."""
    c, tp = spec.cluster, spec.parallel.tp
    gpu = wants_gpu(spec, nodes)
    need = per_rank(spec, gpu)
    if gpu and not any(n.gpus >= 1 for n in nodes):
        raise SpecError("cluster.device", f"cuda requested but no node of the cluster declares a GPU "
                                          f"({len(nodes)} nodes: {_describe(nodes)}); allowed here: auto, cpu")
    fits = [f for f in (ranks_on(n, need) for n in nodes) if f] or [0]  # nodes that can hold a rank
    what = " + ".join(f"{int(v) if v == int(v) else v} {k}" for k, v in need.items())
    if sum(fits) < c.workers:
        raise SpecError("cluster.workers", f"{c.workers} workers × ({what}) do not fit the cluster: its nodes hold "
                                           f"{' + '.join(map(str, fits))} = {sum(fits)} ranks ({_describe(nodes)})")
    if c.placement == "strict_pack" and max(fits) < c.workers:
        raise SpecError("cluster.placement", f"strict_pack puts all {c.workers} ranks of ({what}) on one node, but "
                                             f"the most one node holds is {max(fits)}; allowed here: pack, spread")
    holders = sum(1 for f in fits if f)
    if c.placement == "strict_spread" and holders < c.workers:
        raise SpecError("cluster.placement", f"strict_spread puts each of the {c.workers} ranks on a node of its own, "
                                             f"but {holders} nodes can hold a rank of ({what}); allowed here: pack, spread")
    groups = sum(f // tp for f in fits)
    if tp > 1 and groups < c.workers // tp:
        most = max(fits, default=0)
        raise SpecError("parallel.tp", f"tp={tp} keeps each TP group's {tp} ranks on one node, but the nodes hold "
                                       f"{', '.join(map(str, fits))} ranks of ({what}) (at most {most} on one): "
                                       f"{' + '.join(str(f // tp) for f in fits)} = {groups} TP groups fit, "
                                       f"the job has {c.workers} / {tp} = {c.workers // tp}")


def _describe(nodes: list[Node]) -> str:
    return ", ".join(f"{n.address}: {n.cpus:g} CPU, {n.gpus:g} GPU" for n in nodes) or "none alive"


def validate_on_cluster(spec: JobSpec, address: str) -> None:
    """Connect to the cluster at `address` (staying connected: the driver reuses it) and check the spec."""
    connect(spec, address)
    check_fits(spec, alive_nodes())


def scaling_kwargs(spec: JobSpec) -> dict[str, Any]:
    """Ray Train's placement for the job's ranks: one bundle per rank, `cluster.placement`."""
    return {"placement_strategy": spec.cluster.placement.upper()}
