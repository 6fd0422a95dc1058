"""Job directories, their state file, and the per-user registry of job names.

`<train.output_dir>/<name>/` holds `spec.yaml`, `state.json` (written by the driver only),
`workers/rank<R>.json` (each rank's host, pid, step and heartbeat, written by that rank),
`checkpoints/`, `logs/`, `stop` (a stop request), `fatal.json` (written by rank 0 when a policy
ends the job: Ray Train would restart a raising worker, but a NaN or a full disk comes back) and `hangs.jsonl`
(one line per rank the driver's watchdog killed: that rank's last report, when the watchdog looked and when it
killed). Keeping one writer per file avoids races.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.fileio import atomic_write
from launcher.errors import JobError

STATES = ("PENDING", "RUNNING", "RESTARTING", "SUCCEEDED", "FAILED", "STOPPED")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME", Path.home() / ".lmforge"))


def write_json_atomic(path: Path, data: Any) -> None:
    # Readers (status, the watchdog) need whole files, not durability across a power cut, and heartbeats are
    # rewritten every step: no fsync.
    atomic_write(path, json.dumps(data, indent=1, default=str), fsync=False)


def append_jsonl(path: Path, record: Any) -> None:
    """One line, written with one call and flushed: a reader never sees half a record of a live writer."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


@dataclass(frozen=True)
class JobDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    spec = property(lambda self: self.path / "spec.yaml")
    state_file = property(lambda self: self.path / "state.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    logs = property(lambda self: self.path / "logs")
    workers = property(lambda self: self.path / "workers")
    stop_file = property(lambda self: self.path / "stop")
    fatal_file = property(lambda self: self.path / "fatal.json")  # a rank's reason to end the job without a restart
    hangs_file = property(lambda self: self.path / "hangs.jsonl")  # the watchdog's kills, one JSON object a line

    def create(self) -> None:
        for d in (self.path, self.logs, self.workers, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

    def read_state(self) -> dict[str, Any]:
        return read_json(self.state_file, {}) or {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = self.read_state()
        state.update(fields, updated_at=time.time())
        write_json_atomic(self.state_file, state)
        return state

    def worker_reports(self) -> list[dict[str, Any]]:
        reports = [read_json(p) for p in sorted(self.workers.glob("rank*.json"))]
        return sorted((r for r in reports if r), key=lambda r: r["rank"])


def report_worker(job: JobDir, rank: int, step: int, **extra: Any) -> None:
    """A rank's heartbeat: where it runs and how far it got."""
    write_json_atomic(
        job.workers / f"rank{rank}.json",
        {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step, "heartbeat": time.time(), **extra},
    )


@contextmanager
def _registry_lock():
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / "jobs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def register(job: JobDir) -> None:
    with _registry_lock():
        reg = read_json(home() / "jobs.json", {}) or {}
        reg[job.name] = str(job.path.resolve())
        write_json_atomic(home() / "jobs.json", reg)


def registered() -> dict[str, str]:
    return read_json(home() / "jobs.json", {}) or {}


def find(name: str) -> JobDir:
    """A job by registered name, or by a path to its directory."""
    p = Path(name)
    if (p / "spec.yaml").is_file():
        return JobDir(p.resolve())
    reg = registered()
    if name not in reg:
        known = ", ".join(sorted(reg)) or "none"
        raise JobError(f"no job named {name!r} (known jobs: {known})")
    return JobDir(Path(reg[name]))


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_restarts(job: JobDir) -> int:
    record = read_json(job.path / "attempts.json", {}) or {}
    return record.get("restarts_before", 0) + max(0, record.get("attempts", 1) - 1)


def status(job: JobDir) -> dict[str, Any]:
    """What `launcher status --json` prints: the driver's state merged with the ranks' reports."""
    from parallel import checkpoint

    state = job.read_state()
    reports = job.worker_reports()
    st = state.get("state", "PENDING")
    if st not in TERMINAL and state.get("driver_host") == socket.gethostname() and not pid_alive(state.get("driver_pid")):
        st = "FAILED"
        state.setdefault("error", f"driver process {state.get('driver_pid')} is gone")
    latest = checkpoint.latest_published(job.checkpoints)
    return {
        "name": job.name,
        "state": st,
        "step": max([r.get("step", 0) for r in reports] + [state.get("step", 0)]),
        "restarts": max(state.get("restarts", 0), _live_restarts(job)),
        "workers": [{"rank": r["rank"], "host": r["host"], "pid": r["pid"]} for r in reports],
        "mlflow": state.get("mlflow", {}),
        "last_checkpoint": str(latest) if latest else None,
        "job_dir": str(job.path),
        "error": state.get("error"),
    }
