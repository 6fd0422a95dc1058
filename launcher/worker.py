"""The per-rank training loop, run by Ray Train on every worker (torch.distributed already set up).

Order: topology and groups -> model at full size from one seed -> TP/SP, PP -> DeepSpeed engine
-> data stream at its position (from the newest good checkpoint) -> loop: step, log, evaluate,
checkpoint. `train_loop` runs these as phases that share one `_Run`; every rank calls the same
collectives in the same order (the phases marked "Collective").
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import models
from data_pipeline import DataError, TokenStream, load_manifest, make_loader, val_batches
from launcher import fault_injection, tracking
from launcher.errors import UserError
from launcher.jobs import Heartbeat, JobDir, read_json, report_worker, write_json_atomic
from launcher.spec import JobSpec, spec_from_dict
from launcher.validate import data_parallel_size, init_from_dir, model_config
from parallel import checkpoint, consolidated
from parallel.consolidated import CheckpointMismatchError
from parallel.distributed import limit_threads, pick_device
from parallel.engine import EngineConfig, build_engine
from parallel.context import context_slice
from parallel.parallelize import parallelize
from parallel.pipeline import is_pipeline
from parallel.precision import resolve_dtype
from parallel.safe_load import UnsafeFileError
from parallel.step import ModelLoss, StepResult, eval_loss, train_step
from parallel.topology import ProcessGroups, Topology, build_groups

log = logging.getLogger("lmforge.worker")

# Dense bf16 peak per device, for MFU; devices not listed log no mfu (CPU peaks are not meaningful).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _setup_logging(job: JobDir, rank: int) -> None:
    handler = logging.FileHandler(job.logs / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank says so: all ranks must leave the loop at the same step."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _count_attempt(job: JobDir) -> tuple[int, int]:
    """(attempt index in this driver session, restarts over the job's life); rank 0 counts group starts."""
    path = job.path / "attempts.json"
    record = read_json(path, {}) or {}
    record["attempts"] = record.get("attempts", 0) + 1
    write_json_atomic(path, record)
    return record["attempts"] - 1, record.get("restarts_before", 0) + record["attempts"] - 1


@dataclass
class _Run:
    """What the phases of one attempt share on this rank. `_start_attempt` fills the first block,
    `_build` the model and data, `_open_tracking` and `_open_data` the rest; the loop advances `step`
    and sets `fatal`."""

    config: dict[str, Any]  # from the driver: job_dir, spec, shards, tracking_uri, run_id, spec_hash
    job: JobDir
    spec: JobSpec
    rank: int
    world: int
    device: torch.device
    shards: Path
    vocab_size: int  # the tokenizer's, from the shards' manifest
    dp: int
    accum: int  # micro-batches per optimizer step on this rank
    attempt: int  # index in this driver session (0: the first start)
    restarts: int  # over the job's life
    node: str  # the Ray node id
    startup: dict[str, float] = field(default_factory=dict)  # when each start-up phase of this attempt ended
    # _build
    groups: ProcessGroups = field(init=False)
    dp_rank: int = field(init=False)
    cp_rank: int = field(init=False)
    engine: Any = field(init=False)  # a DeepSpeed engine (a PipelineEngine when pp > 1)
    loss_fn: ModelLoss = field(init=False)
    stream: TokenStream = field(init=False)
    flops_per_token: float | None = field(init=False)
    peak: float | None = field(init=False)
    model_metrics: Callable[..., dict[str, float]] | None = field(init=False)  # the arch's own step metrics
    # _open_tracking (rank 0 only) and _open_data
    logger: tracking.MetricLogger | None = None
    system: tracking.SystemMetrics | None = None
    batches: Iterator[Any] = field(init=False)
    samples: SampleLog | None = None
    # the loop
    step: int = 0
    nonfinite: int = 0  # non-finite steps in this attempt
    fatal: str | None = None  # set: this run must not go on (`_finish` records why)

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device).contiguous()
        dist.all_reduce(t, group=self.groups["dp_cp"])
        return t.cpu()


# Failures no restart can clear: damaged or mismatched data, a checkpoint that would run code or that was
# written for another model, a bad spec.
NOT_RETRIED: tuple[type[BaseException], ...] = (DataError, UnsafeFileError, CheckpointMismatchError, UserError)


def train_loop(config: dict[str, Any]) -> None:
    job = JobDir(Path(config["job_dir"]))
    if job.fatal_file.exists():
        # A rank of the previous attempt hit a failure that cannot clear (NOT_RETRIED) and recorded it; Ray
        # Train restarts the group anyway, and this attempt ends at once, uncounted, so the driver reports it.
        return
    try:
        _train(config)
    except NOT_RETRIED as e:
        _record_fatal(job, str(e))
        raise


def _train(config: dict[str, Any]) -> None:
    entered = time.time()
    run = _start_attempt(config)
    run.startup["worker_entered"] = entered
    with _busy(run):  # long phases: the heartbeat keeps beating
        _build(run)
        _resume(run)
    run.startup["resumed"] = time.time()
    _open_tracking(run)
    _open_data(run)
    run.startup["data_opened"] = time.time()
    try:
        while run.step < run.spec.train.steps:
            if not _train_iteration(run):
                break
    finally:
        _close_tracking(run)
    _finish(run)


def _phases(marks: dict[str, float]) -> str:
    """`a 1.2 s, b 3.4 s`: each mark's time since the one before it."""
    ordered = sorted(marks.items(), key=lambda kv: kv[1])
    return ", ".join(f"{name} +{t - prev:.1f} s" for (name, t), (_, prev) in zip(ordered[1:], ordered))


def _busy(run: _Run) -> Heartbeat:
    return Heartbeat(run.job, run.rank, every_s=max(1.0, run.spec.fault.hang_timeout_s / 4))


def _record_fatal(job: JobDir, error: str, step: int | None = None) -> None:
    """fatal.json, first writer wins (any rank may hit a bad shard; the first cause is the one to report)."""
    log.error("giving up: %s", error)
    try:
        with open(job.fatal_file, "x") as f:
            json.dump({"error": error, "step": step, "time": time.time(), "rank": dist.get_rank()}, f)
    except FileExistsError:
        pass


def _start_attempt(config: dict[str, Any]) -> _Run:
    """Logging, device and threads; counts this attempt and, on a restart, backs off before rebuilding."""
    job = JobDir(Path(config["job_dir"]))
    spec: JobSpec = spec_from_dict(config["spec"])
    rank, world = dist.get_rank(), dist.get_world_size()
    _setup_logging(job, rank)
    device = pick_device(spec.cluster.device)
    limit_threads(spec.cluster.torch_threads or spec.cluster.cpus_per_worker)
    shards = Path(config["shards"])
    manifest = load_manifest(shards)
    dp = data_parallel_size(spec)
    d = spec.data
    attempt, restarts = _broadcast(_count_attempt(job) if rank == 0 else None)
    if attempt:
        # Back off before rebuilding: a failure with an outside cause (a node, the filesystem) gets time to clear.
        wait = min(spec.fault.restart_backoff_s * 2 ** (attempt - 1), 60.0, spec.fault.hang_timeout_s / 2)
        log.warning("restart %d of this run: waiting %.1f s before resuming", attempt, wait)
        time.sleep(wait)
    run = _Run(config=config, job=job, spec=spec, rank=rank, world=world, device=device, shards=shards,
               vocab_size=manifest.vocab_size, dp=dp, accum=d.global_batch // (d.micro_batch * dp),
               attempt=attempt, restarts=restarts, node=_node_id())
    _report(run)  # alive, still building: the watchdog's clock starts here
    return run


def _node_id() -> str:
    """The Ray node this rank runs on (several nodes can share a host name, as in the multi-node tests)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _report(run: _Run, **extra: Any) -> None:
    report_worker(run.job, run.rank, run.step, attempt=run.attempt, node=run.node, startup=run.startup, **extra)


def _build(run: _Run) -> None:
    """Collective: topology and groups, the model (TP/SP, PP) in a DeepSpeed engine, the data stream at
    position 0, and what the step metrics need from the model and the device."""
    spec, p, d, t, o = run.spec, run.spec.parallel, run.spec.data, run.spec.train, run.spec.optim
    topo = Topology(tp=p.tp, pp=p.pp, dp=run.dp, cp=p.cp, ep=p.ep)
    run.groups = build_groups(topo, run.rank)
    _check_tp_node_local(run, topo)
    run.dp_rank = topo.coords(run.rank)["dp"]  # ranks of one TP group / pipeline read the same samples
    run.cp_rank = topo.coords(run.rank)["cp"]  # ...and ranks of one CP group each take a contiguous slice of them
    torch.manual_seed(t.seed)  # torch's RNG starts in the same state on every rank (the weights have their own)
    cfg = model_config(spec, vocab_size=run.vocab_size)  # model.init_from: the checkpoint's vocabulary
    if cfg.vocab_size < run.vocab_size:
        raise ValueError(f"model.init_from: the checkpoint's vocabulary ({cfg.vocab_size}) is smaller than its "
                         f"tokenizer's ({run.vocab_size})")
    if cfg.vocab_size % p.tp:
        raise ValueError(f"the model's vocabulary ({cfg.vocab_size}) is not divisible by parallel.tp={p.tp}")
    # Built on the meta device and sharded there; only this rank's TP shard of its pipeline stage is then
    # materialised in host memory (each weight a function of the seed and its name) and moved to the device.
    with torch.device("meta"):
        meta = models.build(cfg)
    model, run.loss_fn = parallelize(meta, cfg.arch, run.groups, seed=t.seed, sequence_parallel=p.sequence_parallel,
                                     partition=p.pipeline_partition,
                                     activation_checkpointing=t.activation_checkpointing)
    model = model.to(run.device)
    run.startup["model_built"] = time.time()
    arch = models.get_spec(cfg.arch)
    run.engine = build_engine(
        model,
        EngineConfig(
            micro_batch=d.micro_batch, grad_accum=run.accum, dp=run.dp, zero=p.zero, lr=o.lr,
            weight_decay=o.weight_decay, table_params=arch.table_params, table_lr_multiplier=o.table_lr_multiplier,
            table_weight_decay=o.table_weight_decay, beta1=o.beta1, beta2=o.beta2, eps=o.eps,
            grad_clip=o.grad_clip, warmup_steps=o.warmup_steps, total_steps=t.steps,
            min_lr_ratio=o.min_lr_ratio, dtype=resolve_dtype(t.dtype, run.device),
            sequence_parallel=p.sequence_parallel,
        ),
        run.groups,
    )
    run.startup["engine_ready"] = time.time()
    run.stream = TokenStream(run.shards, seed=t.seed, global_batch=d.global_batch, micro_batch=d.micro_batch,
                             dp_rank=run.dp_rank, dp_size=run.dp)
    run.flops_per_token = arch.flops_per_token(cfg, d.seq_len) if arch.flops_per_token else None
    run.peak = _peak_flops(run.device)
    run.model_metrics = arch.step_metrics


def _check_tp_node_local(run: _Run, topo: Topology) -> None:
    """Collective: a TP group's ranks must share a node (its collectives run every layer). Ray numbers ranks
    node by node; a node holding a count of ranks that is not a multiple of tp splits a group: refused."""
    if topo.tp == 1:
        return
    nodes: list[str] = [""] * run.world
    dist.all_gather_object(nodes, run.node)
    for first in range(0, run.world, topo.tp):
        group = nodes[first:first + topo.tp]
        if len(set(group)) > 1:
            counts = {n: nodes.count(n) for n in dict.fromkeys(nodes)}
            raise UserError(f"parallel.tp: the TP group of ranks {first}-{first + topo.tp - 1} spans {len(set(group))} "
                            f"nodes (Ray placed {', '.join(map(str, counts.values()))} ranks on the nodes, not "
                            f"multiples of tp={topo.tp}); use cluster.placement=strict_pack or spread, or a worker "
                            "count that fills each node with whole TP groups")


def _resume(run: _Run) -> None:
    """Collective: the newest good checkpoint (rank 0 picks it) gives the step, the data position and the
    RNG state; without one, Python's and NumPy's RNGs are seeded per rank."""
    ckpt = _broadcast(checkpoint.latest_good(run.job.checkpoints) if run.rank == 0 else None)
    if ckpt is not None:
        client = checkpoint.load(run.engine, ckpt)
        run.stream.load_state_dict(client["data"])
        run.step = client["step"]
        log.info("resumed from %s at step %d", ckpt, run.step)
    else:
        random.seed(run.spec.train.seed + run.rank)
        np.random.seed(run.spec.train.seed + run.rank)
        _init_from(run)


def _init_from(run: _Run) -> None:
    """A fresh run with `model.init_from: hf:DIR`: the transformers checkpoint's weights replace the seeded
    ones (each rank reads the safetensors and keeps its share; a resume loads its own checkpoint instead)."""
    directory = init_from_dir(run.spec)
    if directory is None:
        return
    from models import hf_interop

    cfg = model_config(run.spec, vocab_size=run.vocab_size)
    consolidated.load_weights(run.engine, hf_interop.read_state(directory, cfg), str(directory))
    log.info("initialised from %s", directory)


def _open_tracking(run: _Run) -> None:
    """Rank 0: the MLflow metric logger and system-metrics sampler; records the restart count."""
    uri, run_id = run.config["tracking_uri"], run.config["run_id"]
    if run.rank == 0:
        run.logger = tracking.MetricLogger(uri, run_id, spill=run.job.path / "unsent_metrics.json")
        if run.spec.tracking.system_metrics:
            run.system = tracking.SystemMetrics(uri, run_id)
    if run.logger:
        run.logger.log(run.step, {"restarts": run.restarts})
        tracking.set_tags(uri, run_id, {"restarts": run.restarts})


def _open_data(run: _Run) -> None:
    """Reports this rank ready at its step; the batch iterator and, with data.record_samples, the sample log."""
    d = run.spec.data
    _report(run)
    run.batches = iter(make_loader(run.stream, d.num_workers, with_ids=d.record_samples))
    run.samples = SampleLog(run.job, run.rank) if d.record_samples else None


def _train_iteration(run: _Run) -> bool:
    """One step: train, evaluate when due, log, then checkpoint when due and agree on stopping.
    False: leave the loop."""
    t = run.spec.train
    res, metrics = _train_step(run)
    if "first_step" not in run.startup:
        run.startup["first_step"] = time.time()
        log.info("start-up of this attempt: %s", _phases(run.startup))
    last = run.step + 1 == t.steps
    if not run.fatal and t.eval_every and ((run.step + 1) % t.eval_every == 0 or last):
        metrics["val_loss"] = _evaluate(run)
    if run.logger and (run.step % t.log_every == 0 or last or "val_loss" in metrics or not res.finite):
        run.logger.log(run.step, metrics)
    if run.fatal:
        return False  # no checkpoint from here: the policy says this run must not go on
    run.step += 1
    if run.samples:
        run.samples.commit(run.step, run.attempt)
    _report(run, loss=res.loss)
    stopped = _stop_requested(run)
    if last or stopped or (t.checkpoint_every and run.step % t.checkpoint_every == 0):
        _checkpoint(run, final=last or stopped)
        if run.fatal:
            return False
    if stopped:
        log.info("stop requested: leaving at step %d", run.step)
        return False
    return True


def _train_step(run: _Run) -> tuple[StepResult, dict[str, float]]:
    """One optimizer step over the next global batch, and its metrics. A non-finite loss or gradient
    is counted; under fault.nonfinite=stop it sets `run.fatal`."""
    d, p = run.spec.data, run.spec.parallel
    t0 = time.perf_counter()
    micro = [next(run.batches) for _ in range(run.accum)]
    if run.samples:
        micro = run.samples.split(micro)
    if p.cp > 1:
        micro = [context_slice(b, run.cp_rank, p.cp) for b in micro]
    res = train_step(run.engine, micro, run.device, run.loss_fn)
    aux_values = run.loss_fn.take_aux_terms()
    run.stream.advance_step()
    dt = time.perf_counter() - t0
    tokens_per_s = d.global_batch * d.seq_len / dt
    metrics = {"lr": res.lr, "step_time_s": dt, "tokens_per_s": tokens_per_s}
    if aux_values:  # the model's auxiliary loss term (MoEUT: the entropy regulariser), mean over micro-batches
        metrics["aux_loss"] = float(torch.stack(aux_values).mean())
    if run.model_metrics is not None:
        metrics.update(run.model_metrics(run.engine.module, run.sum_over_dp))
    if res.finite:
        metrics.update(loss=res.loss, grad_norm=res.grad_norm)
    else:
        run.nonfinite += 1
        metrics["nonfinite_steps"] = run.nonfinite
        log.warning("step %d: non-finite loss %s or gradient norm %s; the update was skipped (fault.nonfinite=%s)",
                    run.step, res.loss, res.grad_norm, run.spec.fault.nonfinite)
        if run.spec.fault.nonfinite == "stop":
            good = checkpoint.latest_published(run.job.checkpoints)
            run.fatal = (f"non-finite loss or gradient at step {run.step} (loss {res.loss}, gradient norm "
                         f"{res.grad_norm}; fault.nonfinite=stop); newest good checkpoint: {good or 'none'}")
    if run.peak and run.flops_per_token:
        metrics["mfu"] = run.flops_per_token * tokens_per_s / (run.peak * run.world)
    return res, metrics


def _evaluate(run: _Run) -> float:
    """Collective: the validation loss, over this rank's share of data.eval_samples."""
    d, p = run.spec.data, run.spec.parallel
    val = val_batches(run.shards, micro_batch=d.micro_batch, dp_rank=run.dp_rank, dp_size=run.dp,
                      max_samples=d.eval_samples)
    val = (context_slice(b, run.cp_rank, p.cp) for b in val)
    model = run.engine if is_pipeline(run.engine.module) else run.engine.module
    return eval_loss(model, val, run.device, run.loss_fn, dp_group=run.groups["dp_cp"])


def _stop_requested(run: _Run) -> bool:
    """Collective: whether rank 0 found the stop file; every rank gets the same answer."""
    return _agree(run.rank == 0 and run.job.stop_file.exists(), run.device)


def _checkpoint(run: _Run, final: bool) -> None:
    """Collective: saves this step. A failed write is logged and counted; it sets `run.fatal` under
    fault.checkpoint_errors=fail, and always when `final` (the last step, or a stop)."""
    run_id, spec_hash = run.config["run_id"], run.config["spec_hash"]
    client = {"step": run.step, "data": run.stream.state_dict(), "mlflow_run_id": run_id, "spec_hash": spec_hash}
    meta = {"spec_hash": spec_hash, "world": run.world, "dp": run.dp, "run_id": run_id}
    if run.logger:
        # Metrics up to a checkpoint must be stored before it: a restart re-logs only the steps after it.
        run.logger.flush()
    try:
        started = time.time()
        with _busy(run):  # writing (and fsyncing) a large checkpoint can outlast fault.hang_timeout_s
            time.sleep(fault_injection.checkpoint_delay_s(run.step, run.attempt))
            path = checkpoint.save(run.engine, run.job.checkpoints, run.step, client, meta,
                                   keep=run.spec.train.keep_checkpoints)
        log.info("checkpoint %s in %.1f s", path, time.time() - started)
    except checkpoint.CheckpointWriteError as e:
        log.error("%s", e)
        if run.logger:
            run.logger.log(run.step, {"checkpoint_failures": 1})
        policy = run.spec.fault.checkpoint_errors
        if policy == "fail" or final:
            run.fatal = f"{e} (fault.checkpoint_errors={policy})"


def _close_tracking(run: _Run) -> None:
    if run.logger:
        run.logger.flush()
    if run.system:
        run.system.stop()


def _finish(run: _Run) -> None:
    """Records why the run gave up, if it did; then every rank leaves together."""
    if run.fatal and run.rank == 0:
        _record_fatal(run.job, run.fatal, run.step)
    # Every rank leaves together: DeepSpeed's pipeline engine can abort a process that exits while a
    # peer still has point-to-point traffic in flight (Ray Train destroys the group after this returns).
    dist.barrier()


class SampleLog:
    """Which global sample ids this rank trained on at each step (`data.record_samples`): an audit
    trail that shows, across restarts and resizes, that no sample was repeated or skipped."""

    def __init__(self, job: JobDir, rank: int):
        self.path = job.workers / f"samples_rank{rank}.jsonl"
        self._ids: list[int] = []

    def split(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        self._ids = [int(i) for _, ids in micro for i in ids]
        return [tokens for tokens, _ in micro]

    def commit(self, step: int, attempt: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step - 1, "attempt": attempt, "ids": self._ids}) + "\n")
