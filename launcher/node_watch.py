"""Losing a node: noticed by the driver, which ends the worker group and decides where the job goes on.

Ray Train on its own would restart the group at its full size, wait for placement that a lost node can
never give, and charge each try to `fault.max_restarts`. Instead the driver watches the nodes that run the
current attempt's ranks (their reports name their Ray node); when one leaves the cluster it ends the fit by
killing Ray Train's controller (its process, through the agent on its node: while it waits for placement it
answers no abort), which takes the workers and their placement group with it, and then, with `fault.elastic: true`, resumes on the
capacity left (the largest DP degree that fits, same global batch: the elastic resume), or waits up to
`fault.node_wait_s` for capacity to return (elastic or not: a job with nothing left to run on waits too).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ray.train.v2._internal.execution.callback import ControllerCallback  # DeveloperAPI: RunConfig(callbacks=)

from launcher.background import BackgroundLoop
from launcher.cluster import Node, alive_nodes, check_fits
from launcher.errors import SpecError, UserError
from launcher.jobs import JobDir, read_json, write_json_atomic
from launcher.node_agent import NodeAgents
from launcher.spec import JobSpec

CONTROLLER_FILE = "controller.json"

log = logging.getLogger("lmforge." + __name__)


class RecordController(ControllerCallback):
    """Ray Train callback, run in the controller: writes where the controller runs to `<job>/controller.json`."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir

    def after_controller_start(self, train_run_context) -> None:  # noqa: ANN001
        import ray

        write_json_atomic(Path(self.job_dir) / CONTROLLER_FILE, {
            "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "time": time.time()})


class NodeWatch(BackgroundLoop):
    """A driver thread: `lost` is set (and the fit ended) once a node running a current rank is gone."""

    thread_name = "lmforge-node-watch"

    def __init__(self, job: JobDir, agents: NodeAgents, poll_s: float = 1.0,
                 nodes: Callable[[], list[Node]] = alive_nodes):
        self.job, self.agents, self.poll, self._nodes = job, agents, poll_s, nodes
        self.lost: set[str] = set()
        super().__init__()

    def _running_on(self) -> set[str]:
        """Nodes that ran a rank of this fit (the driver clears the reports before each fit): a rank restarted
        by Ray Train but never placed leaves its predecessor's report, which names the lost node."""
        return {r["node"] for r in self.job.worker_reports() if r.get("node")}

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            used = self._running_on()
            if not used:
                continue
            try:
                alive = {n.node_id for n in self._nodes()}
            except Exception as e:  # noqa: BLE001 - the GCS may be briefly unreachable; look again
                log.warning("could not list the cluster's nodes: %s", e)
                continue
            gone = used - alive
            if gone:
                self.lost = gone
                log.warning("node(s) %s running ranks of this job left the cluster: ending the worker group",
                            ", ".join(sorted(gone)))
                self._end_fit()
                return

    def _end_fit(self) -> None:
        controller = read_json(self.job.path / CONTROLLER_FILE)
        if not controller:
            log.warning("no %s: cannot end the worker group", CONTROLLER_FILE)
            return
        killed, _ = self.agents.kill(controller["node"], controller["pid"], controller["time"])
        log.info("ended Ray Train's controller (pid %d): %s", controller["pid"], "killed" if killed else "gone already")


def remove_placement_groups() -> int:
    """Removes the placement groups of this driver's Ray job: those of a controller killed by NodeWatch
    outlive it (a group lives as long as the job that created it) and would hold the capacity left."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()  # a group's id ends with its job's
    removed = 0
    for pg_id, info in placement_group_table().items():
        if pg_id.endswith(job_id) and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed


def with_workers(spec: JobSpec, workers: int) -> JobSpec:
    """The spec at another worker count (its dp follows: set, or derived from the count)."""
    p = spec.parallel
    dp = None if p.dp is None else workers // (p.tp * p.pp * p.cp)
    return dataclasses.replace(spec, cluster=dataclasses.replace(spec.cluster, workers=workers),
                               parallel=dataclasses.replace(p, dp=dp))


def elastic_workers(spec: JobSpec, nodes: list[Node]) -> int:
    """The most workers, at most the spec's, that the nodes hold with a valid layout (fewer DP ranks, the
    same tp×pp×cp and global batch); 0 if none."""
    from launcher.validate import data_parallel_size, validate

    model_ranks = spec.parallel.tp * spec.parallel.pp * spec.parallel.cp
    for dp in range(data_parallel_size(spec), 0, -1):
        candidate = with_workers(spec, dp * model_ranks)
        try:
            check_fits(candidate, nodes)
            validate(candidate, address="cluster")  # divisibility of the global batch, EP, the model's shapes
        except SpecError:
            continue
        return dp * model_ranks
    return 0


def capacity_after_loss(job: JobDir, spec: JobSpec, lost: set[str], poll_s: float = 1.0) -> int:
    """Workers for the next fit after `lost` left: at once if the capacity is there, else waiting up to
    `fault.node_wait_s` (state RESTARTING, `waiting` says why and until when). UserError when it never comes."""
    f = spec.fault
    want = "the capacity left (fault.elastic)" if f.elastic else f"{spec.cluster.workers} workers (fault.elastic=false)"
    since = time.time()
    deadline = since + f.node_wait_s
    job.update_state(state="RESTARTING", waiting={"for": want, "reason": f"node(s) {', '.join(sorted(lost))} lost",
                                                  "since": since, "until": deadline})
    while True:
        nodes = alive_nodes()
        workers = elastic_workers(spec, nodes) if f.elastic else _full(spec, nodes)
        if workers:
            job.update_state(waiting=None, resumed_on={"workers": workers, "after_s": round(time.time() - since, 1),
                                                       "lost": sorted(lost)})
            log.info("resuming on %d workers after losing node(s) %s", workers, ", ".join(sorted(lost)))
            return workers
        if time.time() >= deadline:
            raise UserError(f"fault.node_wait_s: node(s) {', '.join(sorted(lost))} left the cluster and it did not "
                            f"regain capacity for {want} within {f.node_wait_s:g} s")
        time.sleep(poll_s)


def _full(spec: JobSpec, nodes: list[Node]) -> int:
    try:
        check_fits(spec, nodes)
    except SpecError:
        return 0
    return spec.cluster.workers
