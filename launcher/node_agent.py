"""A small Ray actor per node that acts on that node's processes for the driver: the watchdog judges every
rank's heartbeat wherever the rank runs, and has a hung one killed on its own node through its agent.

The driver may run on a login node or the head node; a rank's pid means something only on the node that
runs it, so the kill (and the check that the pid is still the process that wrote the report) happens there.
Agents take no CPU (they must start on a node whose CPUs the ranks hold), are started on first need, one
per node, and end with the driver's Ray connection.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger("lmforge." + __name__)

CALL_TIMEOUT_S = 20.0  # an agent on a node that just died must not stall the watchdog


def wrote_report(report: dict) -> bool:
    """The report's pid is alive and is the process that wrote it: a dead rank's pid may be reused
    by an unrelated process, which started after the report's heartbeat. Meaningful on the rank's node only."""
    import psutil

    try:
        return psutil.Process(report["pid"]).create_time() <= report["heartbeat"]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_pid(pid: int) -> bool:
    """SIGKILL (it also ends a SIGSTOPped process); False if the process was gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class _Agent:
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def kill_if_wrote(self, pid: int, heartbeat: float) -> bool:
        """SIGKILL `pid` if it is the process that wrote a report at `heartbeat` (a dead rank's pid may have
        been reused by a process started later). SIGKILL also ends a SIGSTOPped process."""
        return wrote_report({"pid": pid, "heartbeat": heartbeat}) and kill_pid(pid)


    def stopped(self, pids: list[int]) -> list[int]:
        """Those of `pids` that are stopped (SIGSTOP, a debugger): frozen, not waiting on a peer."""
        import psutil

        out = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    out.append(pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out


class NodeAgents:
    """The driver's handles on one agent per node, by Ray node id."""

    def __init__(self) -> None:
        self._agents: dict[str, Any] = {}

    def _agent(self, node_id: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node_id not in self._agents:
            cls = ray.remote(num_cpus=0, max_restarts=0)(_Agent)
            self._agents[node_id] = cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote()
        return self._agents[node_id]

    def start(self, node_id: str) -> None:
        self._agent(node_id)

    def kill(self, node_id: str, pid: int, heartbeat: float) -> tuple[bool, str]:
        """(killed, on which node): the agent on `node_id` kills `pid` if it wrote the report at `heartbeat`."""
        import ray

        agent = self._agent(node_id)
        try:
            killed = ray.get(agent.kill_if_wrote.remote(pid, heartbeat), timeout=CALL_TIMEOUT_S)
            where = ray.get(agent.node_id.remote(), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as e:  # the node is gone or unreachable
            log.warning("could not reach the agent on node %s to kill pid %d: %s", node_id, pid, e)
            self._agents.pop(node_id, None)
            return False, node_id
        return bool(killed), where

    def stopped(self, node_id: str, pids: list[int]) -> set[int]:
        import ray

        try:
            return set(ray.get(self._agent(node_id).stopped.remote(pids), timeout=CALL_TIMEOUT_S))
        except (ray.exceptions.RayError, TimeoutError):
            return set()

    def stop(self) -> None:
        import ray

        for agent in self._agents.values():
            try:
                ray.kill(agent)
            except Exception:  # noqa: BLE001 - its node may be gone already
                pass
        self._agents.clear()
