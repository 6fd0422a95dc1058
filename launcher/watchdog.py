"""Driver-side watchdog: turns a silent rank into a dead one, so Ray Train's failure handling restarts the group.

A rank that stops making progress (SIGSTOP, a deadlocked collective, a stuck filesystem) never
raises; its heartbeat file (`workers/rank<R>.json`, rewritten every step) just ages. Past
`fault.hang_timeout_s` the watchdog has that process killed on its own node, wherever that is, by the
node's agent (`launcher.node_agent`); its peers then fail their collectives, Ray Train tears the group
down and starts a new one from the newest good checkpoint. A report without a node (no Ray) is judged
on this host only.
Each kill is recorded in `hangs.jsonl` (the rank's last report, with `checked_at`, the time the watchdog found it
silent, and `killed_at`, the time of the kill), so how fast a hang was caught reads from the system's own clocks.
It also keeps `state.json` between RUNNING and RESTARTING as worker groups come and go.
"""
from __future__ import annotations

import logging
import socket
import time

from launcher.background import BackgroundLoop
from launcher.jobs import JobDir, append_jsonl, pid_alive, read_json
from launcher.node_agent import NodeAgents, kill_pid, wrote_report

log = logging.getLogger("lmforge." + __name__)


class Watchdog(BackgroundLoop):
    thread_name = "lmforge-watchdog"

    def __init__(self, job: JobDir, hang_timeout_s: float, poll_s: float | None = None,
                 agents: NodeAgents | None = None):
        self.job, self.timeout, self.agents = job, hang_timeout_s, agents
        self.poll = poll_s if poll_s is not None else min(5.0, max(0.5, hang_timeout_s / 10))
        self.kills: list[dict] = []
        self._killed: set[tuple[int, float]] = set()  # (pid, heartbeat) of reports already acted on
        self._nodes: set[str] = set()  # nodes whose agent was started
        self._quiet_until = 0.0  # after a kill: time for the group to restart before judging its other ranks
        self._host = socket.gethostname()
        super().__init__()

    def _attempts(self) -> int:
        return (read_json(self.job.path / "attempts.json", {}) or {}).get("attempts", 0)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            attempts = self._attempts()
            reports = self.job.worker_reports()
            current = [r for r in reports if r.get("attempt") == attempts - 1]
            state = self.job.read_state().get("state")
            local_dead = any(r["host"] == self._host and not pid_alive(r["pid"]) for r in current)
            if state == "RUNNING" and (local_dead or (attempts > 1 and not current)):
                self.job.update_state(state="RESTARTING")
            elif current and state == "RESTARTING":
                self.job.update_state(state="RUNNING")
            self._start_agents(current)
            now = time.time()
            if now < self._quiet_until:
                continue
            silent = [r for r in reports if now - r["heartbeat"] > self.timeout and (r["pid"], r["heartbeat"]) not in self._killed]
            # A hung rank's peers wait on it inside a collective and go silent too. One is killed, the likeliest
            # culprit: a stopped process first, else the first to go silent; the others end with the group's
            # restart (or are judged again a timeout later).
            frozen = self._stopped(silent)
            for r in sorted(silent, key=lambda r: ((r.get("node"), r["pid"]) not in frozen, r["heartbeat"])):
                if self._kill(r, now):
                    self._quiet_until = now + self.timeout
                    break

    def _start_agents(self, reports: list[dict]) -> None:
        """An agent on each node that runs a rank, started while nothing is wrong: a kill then costs one call."""
        if self.agents is None:
            return
        for node in {r["node"] for r in reports if r.get("node")} - self._nodes:
            self.agents.start(node)
            self._nodes.add(node)

    def _stopped(self, reports: list[dict]) -> set[tuple[str | None, int]]:
        by_node: dict[str, list[int]] = {}
        for r in reports:
            if r.get("node") and self.agents is not None:
                by_node.setdefault(r["node"], []).append(r["pid"])
        return {(node, pid) for node, pids in by_node.items() for pid in self.agents.stopped(node, pids)}

    def _kill(self, report: dict, checked_at: float) -> bool:
        # Acted on once, whatever came of it: a dead rank's report stays behind, and a killed process lingers
        # as a zombie until its parent reaps it.
        self._killed.add((report["pid"], report["heartbeat"]))
        node = report.get("node")
        if self.agents is not None and node:
            killed, where = self.agents.kill(node, report["pid"], report["heartbeat"])
        elif report["host"] == self._host and wrote_report(report):
            killed, where = kill_pid(report["pid"]), self._host
        else:
            return False
        if not killed:
            return False  # it had ended already: nothing hung
        silent_s = checked_at - report["heartbeat"]
        log.warning("rank %d (pid %d on node %s) sent no heartbeat for %.0f s > fault.hang_timeout_s=%.0f: killed it",
                    report["rank"], report["pid"], where, silent_s, self.timeout)
        record = {**report, "silent_s": silent_s, "checked_at": checked_at, "killed_at": time.time(),
                  "killed_on": where, "hang_timeout_s": self.timeout, "poll_s": self.poll}
        self.kills.append(record)
        try:
            append_jsonl(self.job.hangs_file, record)
        except OSError as e:  # a full disk must not stop the watchdog from killing hung ranks
            log.warning("could not record the kill in %s: %s", self.job.hangs_file, e)
        return True
