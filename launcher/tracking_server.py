"""The job's own MLflow server, for a job whose ranks span nodes and whose spec sets no `tracking.uri`.

An sqlite file on shared storage written by the driver, rank 0 and rank 0's system-metrics thread from
different machines is what corrupts it; behind a server only the server writes it. The orchestrator starts
`mlflow server` (one worker, job execution off) on the head node through a small Ray actor pinned there,
bound to the head node's cluster address, over a store in the job directory (`tracking/mlflow.db`, artifacts
beside it), so it outlives the job for `mlflow ui --backend-store-uri`. The actor restarts a server that dies
(on the same port: the ranks keep their URI) and stops it with the job; ranks buffer metrics meanwhile.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("lmforge." + __name__)

HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node
START_TIMEOUT_S = 120.0
WATCH_EVERY_S = 0.5


def store_uri(store_dir: Path) -> str:
    return f"sqlite:///{Path(store_dir).resolve() / 'mlflow.db'}"


class MlflowServer:
    """`mlflow server` over one sqlite store (one process writes it), in a process group of its own so the
    worker processes it starts (which hold the port) end with it."""

    def __init__(self, store_dir: Path, host: str, port: int):
        self.store_dir, self.host, self.port = Path(store_dir), host, port
        self.uri = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # job runners outlive a SIGTERM
        with open(self.store_dir / "server.log", "a") as out:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--host", self.host, "--port", str(self.port), "--workers", "1",
                 # The Host header the ranks send: MLflow refuses addresses outside private ranges by default.
                 "--allowed-hosts", f"{self.host},{self.host}:{self.port},localhost:{self.port}",
                 "--backend-store-uri", store_uri(self.store_dir),
                 "--artifacts-destination", (self.store_dir / "artifacts").resolve().as_uri()],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_die_with_parent)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            if healthy(self.uri):
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not come up (see {self.store_dir / 'server.log'})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers; the store is sqlite (atomic)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (an actor killed with its driver)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except OSError:
        return False


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Supervisor:
    """Ray actor on the head node: runs the server and restarts it when it dies."""

    def __init__(self, store_dir: str):
        import ray

        host = ray.util.get_node_ip_address()  # the head's cluster address: the other nodes reach it there
        self.server = MlflowServer(Path(store_dir), host, free_port(host)).start()
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lmforge-mlflow-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY_S):
            if self.server.alive():
                continue
            log.warning("mlflow server %s died; restarting it on the same port", self.server.uri)
            self.server.stop()
            try:
                self.server.start()
                self.restarts += 1
            except RuntimeError as e:  # the ranks keep buffering; try again at the next look
                log.warning("%s", e)

    def info(self) -> dict[str, Any]:
        return {"uri": self.server.uri, "pid": self.server.proc.pid if self.server.proc else None,
                "restarts": self.restarts, "store": store_uri(self.server.store_dir)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.stop()


class HeadTrackingServer:
    """The driver's handle: `start` (blocks until the server answers), `info`, `stop`."""

    def __init__(self, store_dir: Path):
        import ray

        # max_concurrency: `info` and `stop` are answered while the watch thread runs.
        cls = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_restarts=0, max_concurrency=4)(_Supervisor)
        self._actor = cls.remote(str(store_dir))
        self.info = ray.get(self._actor.info.remote(), timeout=START_TIMEOUT_S + 60)
        self.uri: str = self.info["uri"]
        self.store: str = self.info["store"]

    def stop(self) -> None:
        import ray

        try:
            ray.get(self._actor.stop.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 - the job's outcome is already decided; report and go on
            log.warning("could not stop the mlflow server %s cleanly: %s", self.uri, e)
        ray.kill(self._actor)


def spans_nodes(nodes: list, per_rank_need: dict[str, float]) -> bool:
    """More than one alive node can hold a rank: the ranks may land on several nodes."""
    from launcher.cluster import ranks_on

    return sum(1 for n in nodes if ranks_on(n, per_rank_need) > 0) > 1
