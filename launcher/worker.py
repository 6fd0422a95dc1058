"""The per-rank training loop, run by Ray Train on every worker (torch.distributed already set up).

Order: topology and groups -> model at full size from one seed -> TP/SP, PP -> DeepSpeed engine
-> data stream at its position (from the newest good checkpoint) -> loop: step, log, evaluate,
checkpoint.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import models
from data_pipeline import TokenStream, load_manifest, make_loader, val_batches
from launcher import tracking
from launcher.jobs import JobDir, read_json, report_worker, write_json_atomic
from launcher.spec import JobSpec, spec_from_dict
from launcher.validate import data_parallel_size, model_config
from parallel import checkpoint
from parallel.distributed import limit_threads, pick_device
from parallel.engine import EngineConfig, build_engine
from parallel.context import context_slice
from parallel.parallelize import parallelize
from parallel.pipeline import is_pipeline
from parallel.precision import resolve_dtype
from parallel.step import eval_loss, train_step
from parallel.topology import Topology, build_groups

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


def train_loop(config: dict[str, Any]) -> None:
    job = JobDir(Path(config["job_dir"]))
    spec: JobSpec = spec_from_dict(config["spec"])
    rank, world = dist.get_rank(), dist.get_world_size()
    _setup_logging(job, rank)
    device = pick_device(spec.cluster.device)
    limit_threads(spec.cluster.torch_threads or spec.cluster.cpus_per_worker)
    dtype = resolve_dtype(spec.train.dtype, device)
    shards = Path(config["shards"])
    manifest = load_manifest(shards)
    dp = data_parallel_size(spec)
    d, t = spec.data, spec.train
    accum = d.global_batch // (d.micro_batch * dp)
    attempt, restarts = _broadcast(_count_attempt(job) if rank == 0 else None)
    if attempt:
        # Back off before rebuilding: a failure with an outside cause (a node, the filesystem) gets time to clear.
        wait = min(spec.fault.restart_backoff_s * 2 ** (attempt - 1), 60.0, spec.fault.hang_timeout_s / 2)
        log.warning("restart %d of this run: waiting %.1f s before resuming", attempt, wait)
        time.sleep(wait)
    report_worker(job, rank, 0, attempt=attempt)  # alive, still building: the watchdog's clock starts here

    p = spec.parallel
    topo = Topology(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, ep=p.ep)
    groups = build_groups(topo, rank)
    dp_rank = topo.coords(rank)["dp"]  # ranks of one TP group / pipeline read the same samples
    cp_rank = topo.coords(rank)["cp"]  # ...and ranks of one CP group each take a contiguous slice of them
    if manifest.vocab_size % p.tp:
        raise ValueError(f"the tokenizer's vocabulary ({manifest.vocab_size}) is not divisible by parallel.tp={p.tp}")
    torch.manual_seed(t.seed)  # torch's RNG starts in the same state on every rank (the weights have their own)
    cfg = model_config(spec, vocab_size=manifest.vocab_size)
    # Built on the meta device and sharded there; only this rank's TP shard of its pipeline stage is then
    # materialised in host memory (each weight a function of the seed and its name) and moved to the device.
    with torch.device("meta"):
        meta = models.build(cfg)
    model, loss_fn = parallelize(meta, cfg.arch, groups, seed=t.seed, sequence_parallel=p.sequence_parallel,
                                 partition=p.pipeline_partition, activation_checkpointing=t.activation_checkpointing)
    model = model.to(device)
    engine = build_engine(
        model,
        EngineConfig(
            micro_batch=d.micro_batch, grad_accum=accum, dp=dp, zero=spec.parallel.zero, lr=spec.optim.lr,
            weight_decay=spec.optim.weight_decay, beta1=spec.optim.beta1, beta2=spec.optim.beta2, eps=spec.optim.eps,
            grad_clip=spec.optim.grad_clip, warmup_steps=spec.optim.warmup_steps, total_steps=t.steps,
            min_lr_ratio=spec.optim.min_lr_ratio, dtype=dtype, sequence_parallel=p.sequence_parallel,
        ),
        groups,
    )
    stream = TokenStream(shards, seed=t.seed, global_batch=d.global_batch, micro_batch=d.micro_batch, dp_rank=dp_rank,
                         dp_size=dp)

    step = 0
    ckpt = _broadcast(checkpoint.latest_good(job.checkpoints) if rank == 0 else None)
    if ckpt is not None:
        client = checkpoint.load(engine, ckpt)
        stream.load_state_dict(client["data"])
        step = client["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    else:
        random.seed(t.seed + rank)
        np.random.seed(t.seed + rank)

    logger = tracking.MetricLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    system = (
        tracking.SystemMetrics(config["tracking_uri"], config["run_id"])
        if rank == 0 and spec.tracking.system_metrics else None
    )
    if logger:
        logger.log(step, {"restarts": restarts})
        tracking.set_tags(config["tracking_uri"], config["run_id"], {"restarts": restarts})
    meta = {"spec_hash": config["spec_hash"], "world": world, "dp": dp, "run_id": config["run_id"]}
    fpt = models.get_spec(cfg.arch).flops_per_token
    model_metrics = models.get_spec(cfg.arch).step_metrics

    def sum_over_dp(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device).contiguous()
        dist.all_reduce(t, group=groups["dp_cp"])
        return t.cpu()

    flops_per_token = fpt(cfg, d.seq_len) if fpt else None
    peak = _peak_flops(device)
    report_worker(job, rank, step, attempt=attempt)

    batches = iter(make_loader(stream, d.num_workers, with_ids=d.record_samples))
    samples = SampleLog(job, rank) if d.record_samples else None
    fatal: str | None = None
    nonfinite = 0
    try:
        while step < t.steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            if samples:
                micro = samples.split(micro)
            if p.cp > 1:
                micro = [context_slice(b, cp_rank, p.cp) for b in micro]
            res = train_step(engine, micro, device, loss_fn)
            aux_values = loss_fn.take_aux_terms()
            stream.advance_step()
            dt = time.perf_counter() - t0
            tokens_per_s = d.global_batch * d.seq_len / dt
            metrics = {"lr": res.lr, "step_time_s": dt, "tokens_per_s": tokens_per_s}
            if aux_values:  # the model's auxiliary loss term (MoEUT: the entropy regulariser), mean over micro-batches
                metrics["aux_loss"] = float(torch.stack(aux_values).mean())
            if model_metrics is not None:
                metrics.update(model_metrics(engine.module, sum_over_dp))
            if res.finite:
                metrics.update(loss=res.loss, grad_norm=res.grad_norm)
            else:
                nonfinite += 1
                metrics["nonfinite_steps"] = nonfinite
                log.warning("step %d: non-finite loss %s or gradient norm %s; the update was skipped (fault.nonfinite=%s)",
                            step, res.loss, res.grad_norm, spec.fault.nonfinite)
                if spec.fault.nonfinite == "stop":
                    good = checkpoint.latest_published(job.checkpoints)
                    fatal = (f"non-finite loss or gradient at step {step} (loss {res.loss}, gradient norm "
                             f"{res.grad_norm}; fault.nonfinite=stop); newest good checkpoint: {good or 'none'}")
            if peak and flops_per_token:
                metrics["mfu"] = flops_per_token * tokens_per_s / (peak * world)
            last = step + 1 == t.steps
            if not fatal and t.eval_every and ((step + 1) % t.eval_every == 0 or last):
                val = val_batches(shards, micro_batch=d.micro_batch, dp_rank=dp_rank, dp_size=dp, max_samples=d.eval_samples)
                val = (context_slice(b, cp_rank, p.cp) for b in val)
                metrics["val_loss"] = eval_loss(engine if is_pipeline(engine.module) else engine.module, val, device,
                                                loss_fn, dp_group=groups["dp_cp"])
            if logger and (step % t.log_every == 0 or last or "val_loss" in metrics or not res.finite):
                logger.log(step, metrics)
            if fatal:
                break  # no checkpoint from here: the policy says this run must not go on
            step += 1
            if samples:
                samples.commit(step, attempt)
            report_worker(job, rank, step, loss=res.loss, attempt=attempt)
            stopped = _agree(rank == 0 and job.stop_file.exists(), device)
            if last or stopped or (t.checkpoint_every and step % t.checkpoint_every == 0):
                client = {"step": step, "data": stream.state_dict(), "mlflow_run_id": config["run_id"], "spec_hash": config["spec_hash"]}
                if logger:
                    # Metrics up to a checkpoint must be stored before it: a restart re-logs only the steps after it.
                    logger.flush()
                try:
                    path = checkpoint.save(engine, job.checkpoints, step, client, meta, keep=t.keep_checkpoints)
                    log.info("checkpoint %s", path)
                except checkpoint.CheckpointWriteError as e:
                    log.error("%s", e)
                    if logger:
                        logger.log(step, {"checkpoint_failures": 1})
                    if spec.fault.checkpoint_errors == "fail" or last or stopped:
                        fatal = f"{e} (fault.checkpoint_errors={spec.fault.checkpoint_errors})"
                        break
            if stopped:
                log.info("stop requested: leaving at step %d", step)
                break
    finally:
        if logger:
            logger.flush()
        if system:
            system.stop()
    if fatal:
        log.error("giving up: %s", fatal)
        if rank == 0:
            write_json_atomic(job.fatal_file, {"error": fatal, "step": step, "time": time.time()})
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
