"""MLflow: one run per job, created by the driver; metrics logged by one rank.

Metric names are a public contract (DESIGN.md): loss, val_loss, lr, grad_norm, tokens_per_s,
mfu, step_time_s, restarts.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from launcher.errors import UserError

log = logging.getLogger("lmforge." + __name__)


def resolve_uri(uri: str | None, output_dir: Path) -> str:
    """Default: an sqlite store under the output dir (MLflow's plain file store is deprecated)."""
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db')}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_writable(uri: str) -> None:
    """Fail before training if the store cannot be written (a read-only dir, a bad scheme)."""
    db = _sqlite_path(uri)
    target = db.parent if db else (Path(uri[len("file://"):]) if uri.startswith("file://") else None)
    if target is None:
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"tracking.uri: cannot create MLflow store directory {target}: {e.strerror}") from None
    if not os.access(target, os.W_OK) or (db and db.exists() and not os.access(db, os.W_OK)):
        raise UserError(f"tracking.uri: MLflow store {target} is not writable")


def probe(uri: str, timeout_s: float) -> None:
    """An MLflow server (http/https) must answer its health check within `timeout_s`: MLflow's own client
    retries an unreachable server for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            if reply.status != 200:
                raise UserError(f"tracking.uri: MLflow server {uri} answered {url} with HTTP {reply.status}")
    except urllib.error.HTTPError as e:
        raise UserError(f"tracking.uri: MLflow server {uri} answered {url} with HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking.uri: no MLflow server answered at {uri} within {timeout_s:g} s "
                        f"({reason}; tracking.probe_timeout_s={timeout_s:g})") from None


def artifact_root(uri: str) -> str | None:
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_run(uri: str, experiment: str, job_name: str, run_id: str | None) -> str:
    """The job's run: the given one if it exists, else the newest with tag job=<name>, else a new one."""
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment, artifact_location=artifact_root(uri))
    except Exception as e:  # noqa: BLE001 - any store failure is a user-facing configuration problem
        raise UserError(f"tracking.uri: cannot use MLflow store {uri}: {e}") from None
    if run_id:
        try:
            c.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001
            log.warning("MLflow run %s not found in %s; looking up by job tag", run_id, uri)
    runs = c.search_runs([exp_id], filter_string=f"tags.job = '{job_name}'", order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return runs[0].info.run_id
    run = c.create_run(exp_id, run_name=job_name, tags={"job": job_name})
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    existing = c.get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        c.log_batch(run_id, params=fresh[i : i + 100])


def log_artifact(uri: str, run_id: str, path: Path) -> None:
    client(uri).log_artifact(run_id, str(path))


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def set_terminated(uri: str, run_id: str, state: str) -> None:
    status = {"SUCCEEDED": "FINISHED", "STOPPED": "KILLED"}.get(state, "FAILED")
    client(uri).set_terminated(run_id, status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


class MetricLogger:
    """Buffers metrics and sends them in batches: one store transaction per flush, not per value.

    Training never fails because tracking does: a flush that cannot reach the store keeps its metrics and
    sends them with the next one (oldest first, at most `max_buffered`; beyond that the oldest are dropped
    and counted), and the first flush that gets through also logs `tracking_errors`, the failed flushes so
    far. With `spill`, what a failed flush kept is also written there (JSON), and the next logger of the run
    (the rank 0 of a restarted group, which resumes from a checkpoint published while the store was down)
    starts from it: a restart does not lose metrics the store never got."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 10, max_buffered: int = 1_000_000,
                 spill: Path | None = None):
        self.uri, self.run_id, self.flush_every, self.max_buffered = uri, run_id, flush_every, max_buffered
        self.spill = spill
        if uri.startswith(("http://", "https://")):
            # MLflow's client retries an unreachable server for minutes inside one call; a step must not wait
            # that long: fail the flush fast and retry at the next one (a user's own settings win).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self._client = client(uri)
        self._buf: list = []
        self._steps_since_flush = 0
        self.errors = 0  # failed flushes
        self.dropped = 0  # metrics dropped because the buffer was full
        self._reported_errors = 0
        self._last_step = 0
        self._load_spill()

    def _load_spill(self) -> None:
        import json

        from mlflow.entities import Metric

        if self.spill is None or not self.spill.is_file():
            return
        try:
            kept = json.loads(self.spill.read_text())
        except (OSError, ValueError) as e:
            log.warning("could not read the metrics kept in %s: %s", self.spill, e)
            return
        self._buf = [Metric(k, v, ts, step) for k, v, ts, step in kept["metrics"]] + self._buf
        self.errors, self._reported_errors = int(kept["errors"]), int(kept["reported"])
        self._last_step = max([self._last_step] + [m.step for m in self._buf])
        log.info("%d metrics an earlier attempt could not send (%s) will be sent", len(kept["metrics"]), self.spill)

    def _write_spill(self) -> None:
        from launcher.jobs import write_json_atomic

        if self.spill is None:
            return
        try:
            write_json_atomic(self.spill, {"errors": self.errors, "reported": self._reported_errors,
                                           "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._buf]})
        except OSError as e:  # a full disk: the metrics stay in memory
            log.warning("could not keep unsent metrics in %s: %s", self.spill, e)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buf.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._last_step = step
        if len(self._buf) > self.max_buffered:
            excess = len(self._buf) - self.max_buffered
            del self._buf[:excess]
            self.dropped += excess
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> bool:
        """Send what is buffered; False (and the metrics kept) if the store could not be reached."""
        from mlflow.entities import Metric

        self._steps_since_flush = 0
        if self.errors != self._reported_errors:
            # one count, the newest: a failed flush must not leave an older one behind to be sent with it
            self._buf = [m for m in self._buf if m.key != "tracking_errors"]
            self._buf.append(Metric("tracking_errors", float(self.errors), int(time.time() * 1000), self._last_step))
        try:
            while self._buf:
                self._client.log_batch(self.run_id, metrics=self._buf[:1000])
                del self._buf[:1000]
        except Exception as e:  # noqa: BLE001 - any store failure: keep the metrics, keep training
            self.errors += 1
            log.warning("MLflow store %s unreachable (%s); %d metrics kept for the next flush (failed flushes: %d)",
                        self.uri, type(e).__name__, len(self._buf), self.errors)
            self._write_spill()
            return False
        self._reported_errors = self.errors
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)
        return True


class SystemMetrics:
    """MLflow's system-metrics sampler (cpu, memory, gpu when present) attached to the job's run."""

    def __init__(self, uri: str, run_id: str, interval_s: float = 10.0):
        self._monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are best effort, never fatal
            log.warning("system metrics disabled: %s", e)
            self._monitor = None

    def stop(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("system metrics monitor did not stop cleanly: %s", e)
