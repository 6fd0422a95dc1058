"""Driver-side watchdog: turns a silent rank into a dead one, so Ray Train's failure handling restarts the group.

A rank that stops making progress (SIGSTOP, a deadlocked collective, a stuck filesystem) never
raises; its heartbeat file (`workers/rank<R>.json`, rewritten every step) just ages. Past
`fault.hang_timeout_s` the watchdog kills that process; its peers then fail their collectives,
Ray Train tears the group down and starts a new one from the newest good checkpoint.
Each kill is recorded in `hangs.jsonl` (the rank's last report, with `checked_at`, the time the watchdog found it
silent, and `killed_at`, the time of the kill), so how fast a hang was caught reads from the system's own clocks.
It also keeps `state.json` between RUNNING and RESTARTING as worker groups come and go.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from launcher.jobs import JobDir, append_jsonl, pid_alive, read_json

log = logging.getLogger("lmforge." + __name__)


def wrote_report(report: dict) -> bool:
    """The report's pid is alive and is the process that wrote it: a dead rank's pid may be reused
    by an unrelated process, which started after the report's heartbeat."""
    import psutil

    try:
        return psutil.Process(report["pid"]).create_time() <= report["heartbeat"]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class Watchdog:
    def __init__(self, job: JobDir, hang_timeout_s: float, poll_s: float | None = None):
        self.job, self.timeout = job, hang_timeout_s
        self.poll = poll_s if poll_s is not None else min(5.0, max(0.5, hang_timeout_s / 10))
        self.kills: list[dict] = []
        self._killed: set[tuple[int, float]] = set()  # (pid, heartbeat) of reports already acted on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-watchdog", daemon=True)
        self._host = socket.gethostname()

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

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
            now = time.time()
            for r in reports:
                if (now - r["heartbeat"] > self.timeout and r["host"] == self._host
                        and (r["pid"], r["heartbeat"]) not in self._killed and wrote_report(r)):
                    self._kill(r, now)

    def _kill(self, report: dict, checked_at: float) -> None:
        silent_s = checked_at - report["heartbeat"]
        log.warning("rank %d (pid %d) sent no heartbeat for %.0f s > fault.hang_timeout_s=%.0f: killing it",
                    report["rank"], report["pid"], silent_s, self.timeout)
        try:
            os.kill(report["pid"], signal.SIGKILL)  # also ends a SIGSTOPped process
        except ProcessLookupError:
            return
        # Killed once: a killed process lingers as a zombie until its parent reaps it, still "alive" to psutil.
        self._killed.add((report["pid"], report["heartbeat"]))
        record = {**report, "silent_s": silent_s, "checked_at": checked_at, "killed_at": time.time(),
                  "hang_timeout_s": self.timeout, "poll_s": self.poll}
        self.kills.append(record)
        try:
            append_jsonl(self.job.hangs_file, record)
        except OSError as e:  # a full disk must not stop the watchdog from killing hung ranks
            log.warning("could not record the kill in %s: %s", self.job.hangs_file, e)
