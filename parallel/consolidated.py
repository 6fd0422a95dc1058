"""Layout-free training state: full fp32 weights and Adam moments per parameter name (safetensors).

DeepSpeed's own checkpoint is exact and fast but tied to the layout it was written under (ZeRO
partitions the optimizer state by dp rank, TP and PP split the parameters). This export, written
into every checkpoint next to it, is what a different layout loads: `launcher resume --set
cluster.workers=M` or `--set parallel.tp=...`. Names are the single-process parameter names;
tensors are whole (gathered over ZeRO partitions and TP shards). Gathering is collective; within
each pipeline stage the ranks then write the parameters they own (round-robin by index), so the
write is spread over the ranks like DeepSpeed's. Loading slices each tensor back to this rank's
TP shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.fileio import atomic_write
from parallel.expert import expert_group_of, gather_experts
from parallel.pipeline import canonical_parameters
from parallel.safe_load import safe_torch_load
from parallel.tensor import gather_full

MOMENTS = ("exp_avg", "exp_avg_sq")
TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # written before trainer state became JSON; read safely


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for another model (parameter names or shapes differ): no restart can fix it."""


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _zero(engine) -> bool:
    return engine.zero_optimization_stage() > 0


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer if _zero(engine) else engine.optimizer


def _adam_step(engine) -> float:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _link_moments(engine, step: float | None = None) -> None:
    """Point every parameter's ZeRO fragment at its slice of the Adam moments.

    DeepSpeed links them once, after the first step of the first param group, so the other
    groups (our no-decay group) keep empty links. With `step`, missing moments are created as
    zeros first (a fresh engine about to receive a consolidated state).
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero_opt = engine.optimizer
    state = zero_opt.optimizer.state
    for lp_params, flat in zip(zero_opt.bit16_groups, zero_opt.single_partition_of_fp32_groups):
        if step is not None and not state.get(flat):
            state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                           **{k: torch.zeros_like(flat) for k in MOMENTS}}
        lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def _tp_group(engine):  # noqa: ANN001, ANN202
    """The TP group from DeepSpeed's view of the layout (our mpu, or the pipeline's grid); None without TP."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None or mpu.get_slice_parallel_world_size() == 1:
        return None
    return mpu.get_slice_parallel_group()


def _stage_rank_world(engine) -> tuple[int, int]:
    """This rank's index among the ranks of its pipeline stage (they hold the same parameters)."""
    rank, world = _rank_world()
    stages = getattr(engine, "num_stages", 1)
    return rank % (world // stages), world // stages  # pp is the slowest axis of the rank grid


def _full(engine, p: torch.nn.Parameter, key: str | None, tp_group) -> torch.Tensor:  # noqa: ANN001
    """Collective under ZeRO (each rank holds a slice of the fp32 copy and moments) and TP (shards)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero(engine):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    elif key is None:
        t = p.detach()
    else:
        t = engine.optimizer.state.get(p, {}).get(key)
        t = torch.zeros_like(p, dtype=torch.float32) if t is None else t
    t = t.detach().float()
    if getattr(p, "tp_shard_dim", None) is not None:
        t.tp_shard_dim = p.tp_shard_dim
        t = gather_full(t, tp_group)
    if getattr(p, "ep_shard_dim", None) is not None:  # an expert shard: whole over the ep group
        t.ep_shard_dim = p.ep_shard_dim
        t = gather_experts(t, expert_group_of(p))
    return t.cpu().contiguous()


def _all_names(engine) -> list[str]:
    """Every parameter name of the model: under PP each stage knows only its own."""
    names = [n for n, _ in canonical_parameters(engine.module)]
    if not dist.is_initialized() or getattr(engine, "num_stages", 1) == 1:
        return names
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, names)
    return sorted({n for ns in everyone for n in ns})


def gather(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors this rank writes, trainer state rank 0 writes). Every rank must call it."""
    rank, world = _stage_rank_world(engine)
    tp_group = _tp_group(engine)
    moments = _adam_step(engine) > 0
    if _zero(engine) and moments:
        _link_moments(engine)
    mine: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(canonical_parameters(engine.module)):
        for key in (None, *MOMENTS):
            if key is None or moments:
                t = _full(engine, p, key, tp_group)
            else:
                t = torch.zeros(_full_shape(p, tp_group), dtype=torch.float32)
            if i % world == rank:
                mine[f"{key or 'param'}/{name}"] = t
    trainer = {
        "adam_step": _adam_step(engine), "global_steps": engine.global_steps, "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "params": _all_names(engine),
    }
    return mine, trainer


def _splits(p: torch.Tensor, tp_group) -> list[tuple[int, object]]:  # noqa: ANN001
    """(dim, group) of each way `p` is sharded: TP, then expert parallel."""
    out = []
    if getattr(p, "tp_shard_dim", None) is not None and tp_group is not None:
        out.append((p.tp_shard_dim, tp_group))
    ep_group = expert_group_of(p)
    if ep_group is not None:
        out.append((p.ep_shard_dim, ep_group))
    return out


def _full_shape(p: torch.Tensor, tp_group) -> list[int]:  # noqa: ANN001
    shape = list(p.shape)
    for dim, group in _splits(p, tp_group):
        shape[dim] *= dist.get_world_size(group)
    return shape


def _my_shard(full: torch.Tensor, p: torch.Tensor, tp_group) -> torch.Tensor:  # noqa: ANN001
    """This rank's TP / expert slice of a whole tensor (the inverse of `_full`)."""
    for dim, group in reversed(_splits(p, tp_group)):
        full = full.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
    return full


def write(out: Path, tensors: dict[str, torch.Tensor], trainer: dict[str, Any]) -> None:
    rank, _ = _rank_world()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"shard_rank{rank}.safetensors"))
    if rank == 0:
        atomic_write(out / TRAINER_STATE, json.dumps(trainer, indent=1), fsync=False)  # the checkpoint fsyncs its tree


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("shard_rank*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors, read_trainer_state(Path(path))


def read_trainer_state(path: Path) -> dict[str, Any]:
    if (path / TRAINER_STATE).is_file():
        return json.loads((path / TRAINER_STATE).read_text())
    return safe_torch_load(path / LEGACY_TRAINER_STATE)


def _per_group(scheduler: dict[str, Any], n_groups: int) -> dict[str, Any]:
    """A scheduler state for `n_groups` param groups: expert parallelism adds groups (its experts' own),
    and every group follows the one schedule, so the first group's entries stand for all."""
    state = dict(scheduler)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(state.get(key), list) and len(state[key]) != n_groups:
            state[key] = [state[key][0]] * n_groups
    return state


@torch.no_grad()
def load_weights(engine, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Whole tensors under single-process names (an imported checkpoint) into a fresh engine of any layout:
    each rank copies its TP / pipeline share, ZeRO's fp32 masters too; the optimizer starts empty."""
    from deepspeed.utils import safe_set_full_fp32_param

    tp_group = _tp_group(engine)
    for name, p in canonical_parameters(engine.module):
        if name not in tensors:
            raise CheckpointMismatchError(f"{source}: no weights for parameter {name}")
        full = tensors[name]
        if _full_shape(p, tp_group) != list(full.shape):
            raise CheckpointMismatchError(f"{source}: {name} has shape {list(full.shape)}, the model "
                                          f"{_full_shape(p, tp_group)}")
        weight = _my_shard(full, p, tp_group).to(p.device, torch.float32).contiguous()
        p.copy_(weight.to(p.dtype))
        if _zero(engine):
            safe_set_full_fp32_param(p, weight)


@torch.no_grad()
def load(engine, path: Path) -> None:
    """Put a consolidated state into an engine of any data-parallel size. Every rank must call it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tensors, trainer = read(path)
    names = _all_names(engine)
    if sorted(names) != sorted(trainer["params"]):
        missing = sorted(set(trainer["params"]) ^ set(names))[:5]
        raise CheckpointMismatchError(f"{path}: parameters differ from the model's (first differences: {missing})")
    tp_group = _tp_group(engine)
    moments = trainer["adam_step"] > 0
    step = torch.tensor(trainer["adam_step"], dtype=torch.float32)
    if _zero(engine) and moments:
        _link_moments(engine, trainer["adam_step"])
    for name, p in canonical_parameters(engine.module):
        def mine(key: str) -> torch.Tensor:
            full = tensors[f"{key}/{name}"]
            if _full_shape(p, tp_group) != list(full.shape):
                raise CheckpointMismatchError(f"{path}: {name} has shape {list(full.shape)}, the model "
                                              f"{_full_shape(p, tp_group)}")
            return _my_shard(full, p, tp_group).to(p.device).contiguous()

        weight = mine("param")
        p.copy_(weight.to(p.dtype))
        if _zero(engine):
            safe_set_full_fp32_param(p, weight)
            for key in MOMENTS if moments else ():
                safe_set_full_optimizer_state(p, mine(key), key)
        elif moments:
            engine.optimizer.state[p] = {"step": step.clone(), **{k: mine(k).clone() for k in MOMENTS}}
    if _zero(engine) and moments:
        for state in _base_optimizer(engine).state.values():
            state["step"] = step.clone()
    if engine.lr_scheduler is not None and trainer["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(_per_group(trainer["lr_scheduler"], len(engine.optimizer.param_groups)))
        # The scheduler sets the groups' lr only when it steps: the next update must use the saved one.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps, engine.global_samples = trainer["global_steps"], trainer["global_samples"]
    engine.skipped_steps = trainer["skipped_steps"]
