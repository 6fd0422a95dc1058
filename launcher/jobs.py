"""Job directories, their state file, and the per-user registry of job names.

`<train.output_dir>/<name>/` holds `spec.yaml`, `state.json` (written by the driver only),
`workers/rank<R>.json` (each rank's host, pid, step and heartbeat, written by that rank),
`checkpoints/`, `logs/`, `stop` (a stop request), `fatal.json` (created once, by the first rank that ends the
job without a restart: a policy (a NaN, a full disk comes back) or a failure no restart can clear (a damaged
shard); Ray Train would restart a raising worker), `hangs.jsonl` (one line per rank the driver's watchdog
killed: that rank's last report, when the watchdog looked and when it killed) and `driver.lock` (flocked by the
job's one driver). Keeping one writer per file avoids races.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.fileio import atomic_write
from launcher.background import BackgroundLoop
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


# One rule for job names: they become a directory under train.output_dir and a registry key.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE_TEXT = "1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def check_name(name: str) -> str:
    """The name if it follows NAME_RULE; else JobError quoting the rule (nothing has been written yet)."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise JobError(f"--name {shown!r} is not a valid job name: {NAME_RULE_TEXT}")
    return name


def default_name(config_stem: str) -> str:
    """`<config stem>-<time>` when no --name is given, with characters outside the rule replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", config_stem).lstrip("._-")[:80] or "job"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def job_dir(output_dir: str | Path, name: str) -> JobDir:
    """`<output_dir>/<name>` for a valid name, checked to resolve inside output_dir (a symlink could point out)."""
    root = Path(output_dir).expanduser().resolve()
    path = (root / check_name(name)).resolve()
    if path.parent != root:
        raise JobError(f"job {name!r} would live at {path}, outside train.output_dir {root}")
    return JobDir(path)


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
    lock_file = property(lambda self: self.path / "driver.lock")  # held (flock) by the job's one driver

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


class DriverLock:
    """An exclusive, non-blocking flock on `driver.lock`, held for the driver's life: of two submits of
    one name started at the same instant exactly one gets it. The kernel drops it when the process dies,
    so a killed driver never leaves a stale lock."""

    def __init__(self, job: JobDir):
        self.job, self._fd = job, None

    def acquire(self) -> "DriverLock":
        self.job.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.job.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_json(self.job.state_file, {}) or {}
            raise JobError(f"job {self.job.name!r} is already running (driver pid {holder.get('driver_pid', '?')}); "
                           f"use `launcher stop {self.job.name}` first") from None
        os.set_inheritable(fd, True)  # a detached driver started from here keeps holding it
        self._fd = fd
        return self

    @property
    def fd(self) -> int | None:
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def report_worker(job: JobDir, rank: int, step: int, **extra: Any) -> None:
    """A rank's heartbeat: where it runs and how far it got."""
    write_json_atomic(
        job.workers / f"rank{rank}.json",
        {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step, "heartbeat": time.time(), **extra},
    )


class Heartbeat(BackgroundLoop):
    """Renews a rank's last report every `every_s` while a long phase runs (building the model, verifying and
    loading a checkpoint, writing one), so the watchdog judges a rank that is stuck, not one that is busy.
    A stopped process's threads stop with it: a frozen rank still goes silent. A deadlocked collective ends
    at the process group's timeout (fault.hang_timeout_s) and raises."""

    thread_name = "lmforge-heartbeat"

    def __init__(self, job: JobDir, rank: int, every_s: float):
        self.path, self.every_s, self.join_s = job.workers / f"rank{rank}.json", every_s, every_s + 5
        super().__init__()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            report = read_json(self.path)
            if report:
                try:
                    write_json_atomic(self.path, {**report, "heartbeat": time.time()})
                except OSError:  # a full disk: the phase reports it; meanwhile the watchdog may act
                    pass


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
    from parallel import checkpoint_manifest as checkpoint  # standard library only: status answers in ~0.1 s

    state = job.read_state()
    reports = job.worker_reports()
    st = state.get("state", "PENDING")
    if st not in TERMINAL and state.get("driver_host") == socket.gethostname() and not pid_alive(state.get("driver_pid")):
        st = "FAILED"
        state.setdefault("error", f"driver process {state.get('driver_pid')} is gone")
    latest = checkpoint.latest_published(job.checkpoints)
    rank0 = next((r for r in reports if r["rank"] == 0), {})
    return {
        "name": job.name,
        "state": st,
        "step": max([r.get("step", 0) for r in reports] + [state.get("step", 0)]),
        "restarts": max(state.get("restarts", 0), _live_restarts(job)),
        "workers": [{"rank": r["rank"], "host": r["host"], "pid": r["pid"], "node": r.get("node"), "step": r.get("step")}
                    for r in reports],
        "mlflow": state.get("mlflow", {}),
        "last_checkpoint": str(latest) if latest else None,
        "job_dir": str(job.path),
        "error": state.get("error"),
        "startup": startup_phases(state.get("startup") or {}, rank0.get("startup") or {}),
        # a node was lost: what the job waits for and why (cleared when it resumes), and what it resumed on
        "waiting": state.get("waiting"),
        "resumed_on": state.get("resumed_on"),
    }


def startup_phases(driver: dict[str, float], rank0: dict[str, float]) -> dict[str, float]:
    """Seconds from the driver process's start to the end of each start-up phase (driver: checks_done,
    ray_connected, trainer_started; rank 0 of the newest attempt: worker_entered, model_built, engine_ready,
    resumed, data_opened, first_step), in order."""
    marks = {**driver, **rank0}
    start = marks.pop("driver_start", None)
    if start is None:
        return {}
    return {k: round(v - start, 3) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}


def wait_terminal(job: JobDir, timeout_s: float, poll_s: float = 0.1) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job.read_state()
        if state.get("state") in TERMINAL:
            return state
        time.sleep(poll_s)
    return job.read_state()
