"""Layout-free training state: full fp32 weights and Adam moments per parameter name (safetensors).

DeepSpeed's own checkpoint is exact and fast but tied to the data-parallel world it was written
under (ZeRO partitions the optimizer state by dp rank). This export, written into every
checkpoint next to it, is what a different layout loads: `launcher resume --set
cluster.workers=M`. Gathering is collective; each rank then writes the parameters it owns
(round-robin by index), so the write is spread over the ranks like DeepSpeed's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

MOMENTS = ("exp_avg", "exp_avg_sq")
TRAINER_STATE = "trainer_state.pt"


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


def _full(engine, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """Collective under ZeRO (each rank holds a slice of the fp32 copy and moments)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero(engine):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    elif key is None:
        t = p.detach()
    else:
        t = engine.optimizer.state.get(p, {}).get(key)
        t = torch.zeros_like(p, dtype=torch.float32) if t is None else t
    return t.detach().float().cpu().contiguous()


def gather(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors this rank writes, trainer state rank 0 writes). Every rank must call it."""
    rank, world = _rank_world()
    moments = _adam_step(engine) > 0
    if _zero(engine) and moments:
        _link_moments(engine)
    mine: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(engine.module.named_parameters()):
        for key in (None, *MOMENTS):
            t = _full(engine, p, key) if key is None or moments else torch.zeros_like(p, dtype=torch.float32)
            if i % world == rank:
                mine[f"{key or 'param'}/{name}"] = t
    trainer = {
        "adam_step": _adam_step(engine), "global_steps": engine.global_steps, "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "params": [n for n, _ in engine.module.named_parameters()],
    }
    return mine, trainer


def write(out: Path, tensors: dict[str, torch.Tensor], trainer: dict[str, Any]) -> None:
    rank, _ = _rank_world()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"shard_rank{rank}.safetensors"))
    if rank == 0:
        torch.save(trainer, out / TRAINER_STATE)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("shard_rank*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors, torch.load(Path(path) / TRAINER_STATE, weights_only=False)


@torch.no_grad()
def load(engine, path: Path) -> None:
    """Put a consolidated state into an engine of any data-parallel size. Every rank must call it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tensors, trainer = read(path)
    names = [n for n, _ in engine.module.named_parameters()]
    if sorted(names) != sorted(trainer["params"]):
        missing = sorted(set(trainer["params"]) ^ set(names))[:5]
        raise ValueError(f"{path}: parameters differ from the model's (first differences: {missing})")
    moments = trainer["adam_step"] > 0
    step = torch.tensor(trainer["adam_step"], dtype=torch.float32)
    if _zero(engine) and moments:
        _link_moments(engine, trainer["adam_step"])
    for name, p in engine.module.named_parameters():
        full = tensors[f"param/{name}"]
        p.copy_(full.to(p.dtype))
        if _zero(engine):
            safe_set_full_fp32_param(p, full.to(p.device))
            for key in MOMENTS if moments else ():
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(p.device), key)
        elif moments:
            engine.optimizer.state[p] = {"step": step.clone(),
                                         **{k: tensors[f"{k}/{name}"].to(p.device).clone() for k in MOMENTS}}
    if _zero(engine) and moments:
        for state in _base_optimizer(engine).state.values():
            state["step"] = step.clone()
    if engine.lr_scheduler is not None and trainer["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        # The scheduler sets the groups' lr only when it steps: the next update must use the saved one.
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps, engine.global_samples = trainer["global_steps"], trainer["global_samples"]
    engine.skipped_steps = trainer["skipped_steps"]
