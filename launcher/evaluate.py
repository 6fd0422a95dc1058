"""`launcher eval`: validation loss of a checkpoint, in this process (no Ray, no process group)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import models
from data_pipeline import load_manifest, val_batches
from launcher import jobs
from launcher.errors import UserError
from launcher.orchestrator import refuse_unsafe_checkpoint_at, resolve_shards
from launcher.spec import load_spec
from launcher.validate import model_config
from parallel import checkpoint, consolidated
from parallel.step import eval_loss


def resolve_checkpoint(target: str) -> tuple[jobs.JobDir, Path]:
    """The job and the checkpoint to evaluate: intact, and holding nothing that would run code when loaded."""
    p = Path(target)
    if (p / checkpoint.MANIFEST).is_file():  # a checkpoint directory: <job>/checkpoints/step_N
        problem = checkpoint.verify(p)
        if problem:
            raise UserError(f"checkpoint {p}: {problem}")
        job, ckpt = jobs.JobDir(p.resolve().parent.parent), p
    else:
        job = jobs.find(target)
        ckpt = checkpoint.latest_good(job.checkpoints)
        if ckpt is None:
            raise UserError(f"job {job.name} has no complete checkpoint in {job.checkpoints}")
    refuse_unsafe_checkpoint_at(ckpt)
    return job, ckpt


@dataclass
class LoadedCheckpoint:
    """A job's checkpoint as one process holds it: the whole model in fp32 on the CPU, in eval mode."""

    job: jobs.JobDir
    checkpoint: Path
    spec: Any
    shards: Path
    manifest: Any
    model: torch.nn.Module

    @property
    def step(self) -> int:
        return checkpoint.read_manifest(self.checkpoint)["step"]


def load_checkpoint_model(target: str) -> LoadedCheckpoint:
    """Resolve `target` (a job name or a checkpoint directory) and build its model from the consolidated export."""
    job, ckpt = resolve_checkpoint(target)
    spec = load_spec(job.spec)
    shards = resolve_shards(spec)
    manifest = load_manifest(shards)
    torch.manual_seed(spec.train.seed)
    model = models.build(model_config(spec, vocab_size=manifest.vocab_size))
    # The consolidated export holds whole tensors under single-process names, whatever layout wrote it.
    if not (ckpt / "consolidated").is_dir():
        raise UserError(f"checkpoint {ckpt}: no consolidated export")
    tensors, _ = consolidated.read(ckpt / "consolidated")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"param/{name}" not in tensors:
                raise UserError(f"checkpoint {ckpt}: no weights for parameter {name}")
            p.copy_(tensors[f"param/{name}"])
    return LoadedCheckpoint(job, ckpt, spec, shards, manifest, model.eval())


def evaluate(target: str, max_samples: int | None = None) -> dict[str, Any]:
    loaded = load_checkpoint_model(target)
    spec, shards, manifest, model, ckpt = loaded.spec, loaded.shards, loaded.manifest, loaded.model, loaded.checkpoint
    samples = max_samples or manifest.val.samples
    batches = val_batches(shards, micro_batch=spec.data.micro_batch, dp_rank=0, dp_size=1, max_samples=samples)
    loss = eval_loss(model, batches, torch.device("cpu"))
    return {"checkpoint": str(ckpt), "step": checkpoint.read_manifest(ckpt)["step"], "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)), "samples": min(samples, manifest.val.samples)}


def run_tasks(target: str, tasks: list[str], samples: int | None = None, blimp_dir: str | None = None,
              blimp_pairs: int | None = None, log: bool = True) -> dict[str, Any]:
    """Each task's metrics for the checkpoint; with `log`, also into the job's MLflow run as
    `eval/<task>/<metric>` at the checkpoint's step."""
    from launcher import tracking
    from launcher.eval_tasks import TASKS

    loaded = load_checkpoint_model(target)
    results = {t: TASKS[t](loaded, samples=samples, blimp_dir=blimp_dir, blimp_pairs=blimp_pairs) for t in tasks}
    out: dict[str, Any] = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "tasks": results}
    mlflow = loaded.job.read_state().get("mlflow") or {}
    if log and mlflow.get("run_id"):
        metrics = {f"eval/{t}/{k}": v for t, r in results.items() for k, v in r.items() if math.isfinite(v)}
        client = tracking.client(mlflow["tracking_uri"])
        for key, value in metrics.items():
            client.log_metric(mlflow["run_id"], key, value, step=loaded.step)
        out["mlflow"] = {**mlflow, "metrics": len(metrics)}
    return out
