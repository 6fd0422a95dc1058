"""Training never fails because tracking does: the metric logger against a real `mlflow server` that is
killed mid-run keeps what it could not send, and delivers all of it once a server is back on the store,
with the failed flushes reported as `tracking_errors`."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ray_head import free_port


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over one sqlite store (one process writes it)."""

    def __init__(self, store: Path, port: int):
        self.store, self.port, self.proc = store, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> "MlflowServer":
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--backend-store-uri", f"sqlite:///{self.store}", "--workers", "1",
                                      "--default-artifact-root", (self.store.parent / "artifacts").as_uri()],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not come up")

    def stop(self) -> None:
        """Kill the server and the worker processes it started (they hold the port)."""
        import psutil

        if self.proc is not None:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(tree, timeout=30)
            self.proc = None


@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(tmp_path):
    from mlflow.tracking import MlflowClient

    from launcher.tracking import MetricLogger, probe

    server = MlflowServer(tmp_path / "mlflow.db", free_port()).start()
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = MetricLogger(server.uri, run_id, flush_every=1)
        for step in range(3):
            logger.log(step, {"loss": 10.0 - step})
        assert logger.errors == 0
        server.stop()
        for step in range(3, 6):  # the server is gone: every flush fails, nothing raises, nothing is lost
            logger.log(step, {"loss": 10.0 - step})
        assert logger.errors == 3
        server.start()  # back, on the same store
        probe(server.uri, 5.0)
        logger.log(6, {"loss": 4.0})
        assert logger.errors == 3 and logger.dropped == 0
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert history == [(s, 10.0 - s) for s in range(7)]
        assert [m.value for m in client.get_metric_history(run_id, "tracking_errors")][-1] == 3
    finally:
        server.stop()
