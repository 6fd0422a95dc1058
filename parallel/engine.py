"""Wrap a single-device model in a DeepSpeed engine: ZeRO 0/1/2, AdamW, warmup+cosine, clipping, accumulation."""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from parallel import safe_load
from parallel.distributed import skip_cpu_shm_build
from parallel.mpu import MPU
from parallel.optimizer import FiniteAdamW
from parallel.pipeline import is_pipeline
from parallel.schedule import warmup_cosine
from parallel.step import ModelLoss
from parallel.topology import ProcessGroups

log = logging.getLogger("lmforge." + __name__)


@dataclass
class EngineConfig:
    micro_batch: int
    grad_accum: int
    dp: int
    zero: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.1
    table_params: str | None = None  # parameter-name pattern of sparse lookup tables (ModelSpec.table_params)
    table_lr_multiplier: float = 1.0
    table_weight_decay: float | None = None  # None: weight_decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.1
    dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    whole_activations: bool = False  # pipeline sends activations whole (set for pipelines carrying aux tensors)
    cp: int = 1  # taken from the topology by `build_engine`


def deepspeed_config(cfg: EngineConfig) -> dict:
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        # DeepSpeed counts context-parallel ranks as data parallel (it reduces gradients over dp×cp); they
    # read slices of the same samples, so its "batch" is cp times ours.
    "train_batch_size": cfg.micro_batch * cfg.grad_accum * cfg.dp * cfg.cp,
        # Without ZeRO our optimizer clips (and reports the norm); ZeRO clips inside DeepSpeed.
        "gradient_clipping": cfg.grad_clip if cfg.zero > 0 else 0.0,
        "zero_optimization": {"stage": cfg.zero},
        # FiniteAdamW is torch's AdamW plus a finiteness check; DeepSpeed only knows it by class.
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's pipeline sends 1/tp of an activation per TP rank and all-gathers it, assuming TP ranks
        # hold equal activations; under sequence parallelism each holds its own shard, so send it whole. Its
        # partitioning also allows only the first tensor to carry a gradient: aux tensors travel whole too.
        "pipeline": {"pipe_partitioned": not (cfg.sequence_parallel or cfg.whole_activations),
                     "grad_partitioned": not (cfg.sequence_parallel or cfg.whole_activations)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif cfg.dtype == torch.float16:
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def param_groups(model: nn.Module, weight_decay: float, lr: float, tables: TableGroup | None = None) -> list[dict]:
    """Decay matrices and embeddings; never norms' gains or biases. Lookup tables matching `tables.pattern`
    get a group of their own (its lr multiplier and decay). Expert-parallel parameters go to groups of their
    own marked `moe` (DeepSpeed's convention: ZeRO partitions those over the expert-data-parallel group)."""
    decay, no_decay, table = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if tables is not None and tables.matches(name):
            table.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    out = [{"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
           {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if table:
        out.append({"name": "tables", "params": table, "weight_decay": tables.weight_decay, "lr": lr * tables.lr_multiplier})
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        out = [g for g in split_params_into_different_moe_groups_for_optimizer(out) if g["params"]]
    return out


@dataclass(frozen=True)
class TableGroup:
    """Sparse lookup tables' optimizer settings: parameters whose name matches `pattern` (fnmatch: `*` spans
    dots, so "*.memory.tables" holds under any prefix a pipeline stage or a wrapper gives the name)."""

    pattern: str
    lr_multiplier: float = 1.0
    weight_decay: float = 0.1

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


def table_group(cfg: EngineConfig) -> TableGroup | None:
    if cfg.table_params is None:
        return None
    decay = cfg.weight_decay if cfg.table_weight_decay is None else cfg.table_weight_decay
    return TableGroup(cfg.table_params, cfg.table_lr_multiplier, decay)


def build_engine(model: nn.Module, cfg: EngineConfig, groups: ProcessGroups | None = None):
    """Return a DeepSpeed engine (a `PipelineEngine` for a `PipelineModule`); torch.distributed must be initialised.

    Without pipeline parallelism DeepSpeed gets our `mpu`; a `PipelineModule` brings its own grid
    (DeepSpeed then expects `mpu=None`), built with the same rank order.
    """
    import deepspeed

    skip_cpu_shm_build()
    topo = groups.topology if groups is not None else None
    if topo is not None:
        cfg = dataclasses.replace(cfg, cp=topo.cp)
    if is_pipeline(model) and isinstance(model.loss_fn, ModelLoss) and model.loss_fn.carries_aux:
        cfg = dataclasses.replace(cfg, whole_activations=True)  # DeepSpeed's partitioned sends carry one gradient
    if is_pipeline(model) and cfg.zero > 1:
        raise ValueError(f"pipeline parallelism allows ZeRO stage 0 or 1 (DeepSpeed's pipeline engine), got {cfg.zero}")
    optimizer = FiniteAdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, table_group(cfg)), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        max_norm=cfg.grad_clip if cfg.zero == 0 else 0.0,
        tp_group=groups["tp"] if topo is not None and topo.tp > 1 else None,
        pp_group=groups["pp"] if topo is not None and topo.pp > 1 else None,
        ep_group=groups["ep"] if topo is not None and topo.ep > 1 else None,
    )
    mpu = MPU(groups) if groups is not None and not is_pipeline(model) else None
    schedule = functools.partial(
        warmup_cosine, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps, min_ratio=cfg.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        mpu=mpu,
        dist_init_required=False,
    )
    safe_load.install(engine)  # DeepSpeed's own loader unpickles without the weights-only guard
    return engine
