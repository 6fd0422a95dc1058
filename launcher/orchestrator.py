"""The driver: prepare data, open the MLflow run, start Ray, run the worker group, record the outcome."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from launcher import tracking
from launcher.background import BackgroundLoop
from launcher.cluster import alive_nodes, connect, scaling_kwargs, wants_gpu
from launcher.errors import UserError
from launcher.jobs import JobDir, read_json, write_json_atomic
from launcher.node_agent import NodeAgents
from launcher.spec import JobSpec, dump_spec
from launcher.validate import init_from_dir
from launcher.watchdog import Watchdog

log = logging.getLogger("lmforge." + __name__)


def resolve_shards(spec: JobSpec) -> Path:
    """The shard directory, prepared here (driver side, once) when missing and a corpus is given."""
    from data_pipeline import DataError, default_shards_dir, load_manifest, prepare

    d = spec.data
    shards = Path(d.shards).expanduser() if d.shards else default_shards_dir(d.corpus or "builtin", d.vocab_size, d.seq_len)
    # model.init_from: the checkpoint's own tokenizer encodes the data (validate.py checked it exists)
    given = init_from_dir(spec) / "tokenizer.json" if init_from_dir(spec) else d.tokenizer
    if (shards / "manifest.json").is_file():
        manifest = load_manifest(shards)
        if manifest.seq_len != d.seq_len:
            raise UserError(f"data.seq_len: {d.seq_len} but the shards in {shards} were packed for seq_len {manifest.seq_len}")
        if init_from_dir(spec) and manifest.tokenizer_sha256 != hashlib.sha256(Path(given).read_bytes()).hexdigest():
            raise UserError(f"data.shards: {shards} were tokenized with another tokenizer than model.init_from's "
                            f"{given}; prepare them with it (launcher data prepare --tokenizer {given})")
        return shards
    if d.corpus is None:
        raise UserError(f"data.shards: no prepared shards in {shards}; run `launcher data prepare --out {shards}` first")
    if d.corpus != "builtin" and not Path(d.corpus).expanduser().exists():
        raise UserError(f"data.corpus: {d.corpus} does not exist (use `builtin` or a file/directory of .txt/.jsonl)")
    log.info("preparing data from %s into %s", d.corpus, shards)
    try:
        prepare(
            d.corpus if d.corpus == "builtin" else str(Path(d.corpus).expanduser()), shards,
            vocab_size=d.vocab_size, seq_len=d.seq_len, samples_per_shard=d.samples_per_shard,
            tokenizer=Path(given).expanduser() if given else None,
        )
    except DataError as e:
        raise UserError(f"data: {e}") from None
    return shards


def refuse_unsafe_checkpoint(job: JobDir) -> None:
    """UserError naming the file when the checkpoint a resume would load holds more than tensors and plain values."""
    from parallel import checkpoint_manifest

    ckpt = checkpoint_manifest.latest_good(job.checkpoints)
    if ckpt is not None:
        refuse_unsafe_checkpoint_at(ckpt)


def refuse_unsafe_checkpoint_at(ckpt: Path) -> None:
    from parallel import safe_load

    try:
        safe_load.refuse_unsafe(ckpt)
    except safe_load.UnsafeFileError as e:
        raise UserError(str(e)) from None


def _verify_shards_upfront(spec: JobSpec, shards: Path) -> None:
    from data_pipeline import DataError, load_manifest, verify_shards

    limit = int(spec.data.verify_upfront_mb * 2**20)
    try:
        if limit and verify_shards(shards, load_manifest(shards), limit):
            log.info("verified the checksums of the shards in %s", shards)
    except DataError as e:
        raise UserError(f"data: {e}") from None


def _torch_config(job: JobDir, spec: JobSpec, address: str | None, use_gpu: bool):  # noqa: ANN202
    """Ray Train's TCP rendezvous on a remote cluster; a file in the job directory on the embedded one."""
    from ray.train.torch import TorchConfig

    from launcher.rendezvous import FileRendezvousConfig

    kw = dict(backend="nccl" if use_gpu else "gloo", timeout_s=int(spec.fault.hang_timeout_s))
    if address:
        return TorchConfig(**kw)
    return FileRendezvousConfig(**kw, rendezvous_dir=str(job.path / "rendezvous"))


class _Progress(BackgroundLoop):
    """Polls the ranks' heartbeat files and shows step and loss (rich bar on a terminal, log lines otherwise)."""

    thread_name, join_s = "lmforge-progress", 5.0

    def __init__(self, job: JobDir, total: int, show_bar: bool):
        self.job, self.total, self.show_bar = job, total, show_bar
        super().__init__()

    def _latest(self) -> tuple[int, float | None]:
        reports = self.job.worker_reports()
        r0 = next((r for r in reports if r["rank"] == 0), None)
        return (r0["step"], r0.get("loss")) if r0 else (0, None)

    def _run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.show_bar:
            last = -1
            while not self._stop.wait(5):
                step, loss = self._latest()
                if step != last and loss is not None:
                    log.info("step %d/%d loss %.4f", step, self.total, loss)
                    last = step
            return
        cols = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"), TimeRemainingColumn()]
        with Progress(*cols, transient=False) as bar:
            task = bar.add_task("train", total=self.total, loss="")
            while not self._stop.wait(0.5):
                step, loss = self._latest()
                bar.update(task, completed=step, loss=f"loss {loss:.4f}" if loss is not None else "")
            step, loss = self._latest()
            bar.update(task, completed=step, loss=f"loss {loss:.4f}" if loss is not None else "")


def run_job(job: JobDir, spec: JobSpec, address: str | None = None, show_bar: bool = False) -> dict[str, Any]:
    """Run (or resume) the job to an end state; returns the final state dict."""
    job.create()
    job.stop_file.unlink(missing_ok=True)
    job.fatal_file.unlink(missing_ok=True)
    for stale in job.workers.glob("rank*.json"):  # reports of an earlier run would look like hung ranks
        stale.unlink()
    prior_restarts = job.read_state().get("restarts", 0)
    write_json_atomic(job.path / "attempts.json", {"attempts": 0, "restarts_before": prior_restarts})
    dump_spec(spec, job.spec)
    prior = job.read_state()
    startup = {"driver_start": _process_start()}  # `status --json` shows the phases from here (imports included)
    job.update_state(name=job.name, state="PENDING", driver_pid=os.getpid(), driver_host=socket.gethostname(),
                     job_dir=str(job.path), error=None, steps=spec.train.steps, startup=startup, waiting=None)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
    try:
        try:
            # What no restart can fix is checked here, before any worker: a checkpoint that would run code, an
            # unreachable tracking store, missing or damaged shards.
            refuse_unsafe_checkpoint(job)
            server = _tracking_server(job, spec, address)
            uri = server.uri if server else tracking.resolve_uri(spec.tracking.uri, Path(spec.train.output_dir))
            tracking.check_writable(uri)
            tracking.probe(uri, spec.tracking.probe_timeout_s)
            shards = resolve_shards(spec)
            _verify_shards_upfront(spec, shards)
            run_id = tracking.ensure_run(uri, spec.tracking.experiment, job.name, prior.get("mlflow", {}).get("run_id"))
            tracking.log_params(uri, run_id, {**spec.flat(), "data.shards_resolved": str(shards)})
            tracking.log_artifact(uri, run_id, job.spec)
            if (shards / "tokenizer.json").is_file():
                tracking.log_artifact(uri, run_id, shards / "tokenizer.json")
            startup["checks_done"] = time.time()
            mlflow = {"tracking_uri": uri, "run_id": run_id, **({"store": server.store, "server": server.uri} if server else {})}
            job.update_state(mlflow=mlflow, startup=startup)
        except UserError as e:
            job.update_state(state="FAILED", error=str(e))
            raise
        state, error = _fit(job, spec, address, show_bar, startup, {"shards": str(shards), "tracking_uri": uri, "run_id": run_id})
        try:
            tracking.set_terminated(uri, run_id, state)
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark the MLflow run finished: %s", e)
    finally:
        if server:
            server.stop()  # the store stays in the job directory: status then names it as the tracking URI
            job.update_state(mlflow={**job.read_state().get("mlflow", {}), "tracking_uri": server.store})
        _shutdown_ray(address)
    record = read_json(job.path / "attempts.json", {}) or {}
    restarts = prior_restarts + max(0, record.get("attempts", 1) - 1)
    return job.update_state(state=state, error=str(error) if error else None, restarts=restarts,
                            step=max([r.get("step", 0) for r in job.worker_reports()] + [0]))


def _tracking_server(job: JobDir, spec: JobSpec, address: str | None):  # noqa: ANN202
    """The job's own MLflow server on the head node when no tracking.uri is set and the ranks may span nodes,
    or an earlier run of the job made its store (a resume on one node continues that run: its artifacts are
    served by a server, `mlflow-artifacts:` URIs, which a plain sqlite client cannot write)."""
    if spec.tracking.uri:
        return None
    from launcher.cluster import per_rank
    from launcher.tracking_server import HeadTrackingServer, spans_nodes

    own_store = (job.path / "tracking" / "mlflow.db").is_file()
    if not address and not own_store:
        return None
    connect(spec, address, job.path)
    nodes = alive_nodes()
    if not own_store and not spans_nodes(nodes, per_rank(spec, wants_gpu(spec, nodes))):
        return None
    server = HeadTrackingServer(job.path / "tracking")
    log.info("MLflow server %s on the head node, store %s", server.uri, server.store)
    return server


def _fit(job: JobDir, spec: JobSpec, address: str | None, show_bar: bool, startup: dict[str, float],
         config: dict[str, Any]) -> tuple[str, str | None]:
    """Ray Train runs the worker group (restarting it after a crash or hang) until the job ends; a lost node
    ends the group and the job goes on on the capacity there is (`launcher.node_watch`). (state, error)."""
    from launcher.node_watch import (CONTROLLER_FILE, NodeWatch, capacity_after_loss, remove_placement_groups,
                                     with_workers)

    state, error, run_spec = "FAILED", None, spec
    try:
        connect(spec, address, job.path)
        startup["ray_connected"] = time.time()
        while True:
            for stale in job.workers.glob("rank*.json"):  # a rank of a smaller group, or on a lost node
                stale.unlink()
            (job.path / CONTROLLER_FILE).unlink(missing_ok=True)
            trainer = _trainer(job, run_spec, address, config)
            startup.setdefault("trainer_started", time.time())
            job.update_state(state="RUNNING", startup=startup, workers_now=run_spec.cluster.workers)
            agents = NodeAgents()
            result = None
            try:
                with (_Progress(job, spec.train.steps, show_bar), Watchdog(job, spec.fault.hang_timeout_s, agents=agents),
                      NodeWatch(job, agents) as watch):
                    try:
                        result = trainer.fit()
                    except Exception:  # noqa: BLE001 - the node watch ended the fit: its controller died
                        if not watch.lost:
                            raise
            finally:
                agents.stop()
            if watch.lost:
                log.info("removed %d placement group(s) of the ended worker group", remove_placement_groups())
            if watch.lost and not _finished(job, spec):
                run_spec = with_workers(spec, capacity_after_loss(job, spec, watch.lost))
                continue
            break
        fatal = read_json(job.fatal_file)  # a rank's own one-line cause beats Ray's traceback of it
        failed = getattr(result, "error", None)
        error = fatal["error"] if fatal else (failed and (_placement_timeout(failed, run_spec) or str(failed)))
        state = "FAILED" if error else ("STOPPED" if job.stop_file.exists() else "SUCCEEDED")
    except (KeyboardInterrupt, SystemExit):
        state, error = "STOPPED", "interrupted"
    except UserError as e:
        state, error = "FAILED", str(e)
    except Exception as e:  # noqa: BLE001 - recorded in state.json and shown by `status`
        state, error = "FAILED", _placement_timeout(e, run_spec) or f"{type(e).__name__}: {e}"
        log.exception("job failed")
    return state, error


def _finished(job: JobDir, spec: JobSpec) -> bool:
    from parallel import checkpoint_manifest

    latest = checkpoint_manifest.latest_published(job.checkpoints)
    return latest is not None and checkpoint_manifest.step_of(latest) >= spec.train.steps


def _trainer(job: JobDir, spec: JobSpec, address: str | None, config: dict[str, Any]):  # noqa: ANN202
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from launcher.node_watch import RecordController
    from launcher.worker import train_loop

    use_gpu = wants_gpu(spec, alive_nodes())  # the same rule validation applied to the cluster
    # Placement that never comes (resources the cluster does not have free) ends the fit after
    # cluster.placement_timeout_s instead of being retried for ever.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(spec.cluster.placement_timeout_s)
    return TorchTrainer(
        train_loop,
        train_loop_config={"job_dir": str(job.path), "spec": spec.to_dict(), "spec_hash": spec.hash(), **config},
        scaling_config=ScalingConfig(
            num_workers=spec.cluster.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": spec.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            **scaling_kwargs(spec),
        ),
        # A collective waiting on a dead or frozen peer gives up after the hang timeout too.
        torch_config=_torch_config(job, spec, address, use_gpu),
        run_config=RunConfig(
            name=job.name, storage_path=str(job.path / "ray"),
            failure_config=FailureConfig(max_failures=spec.fault.max_restarts, controller_failure_limit=0),
            callbacks=[RecordController(str(job.path))],
        ),
    )


def _placement_timeout(error: BaseException, spec: JobSpec) -> str | None:
    """The one-line cause when Ray Train's error (returned or raised) is its worker-group start timeout."""
    if "StartupTimeout" not in type(error).__name__ and "startup timed out" not in f"{error}":
        return None
    c = spec.cluster
    return (f"cluster.placement_timeout_s: the resources of {c.workers} workers × {c.cpus_per_worker} CPU"
            f"{' + 1 GPU' if c.device == 'cuda' else ''} ({c.placement}) were not free within "
            f"{c.placement_timeout_s:g} s (other jobs hold them, or the nodes that had them are gone)")


def _process_start() -> float:
    import psutil

    return psutil.Process(os.getpid()).create_time()


def _raise_interrupt(signum, frame):  # noqa: ANN001
    raise KeyboardInterrupt


def _shutdown_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
