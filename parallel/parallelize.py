"""Turn a single-device model into this rank's part of the layout: TP/SP, CP, EP, then PP.

The one place that reads a model's registration (TP plan, pipeline blocks) and the topology, so
the worker, the layout harness and the benchmarks build every layout the same way. The model is
either full-size and initialised (its weights are sliced) or, as the worker and the harness build
it, on the meta device: then every swap only changes shapes, and `materialize` fills just the
parameters this rank keeps (its TP/EP shards of its pipeline stage) from (seed, name, full shape).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

import models
from parallel.apply_tp import apply_tensor_parallel
from parallel.context import apply_context_parallel
from parallel.expert import apply_expert_parallel
from parallel.materialize import materialize
from parallel.pipeline import build_pipeline, stage_bounds
from parallel.step import ModelLoss, lm_loss, logsumexp
from parallel.tensor import vocab_parallel_logsumexp, vocab_parallel_loss
from parallel.topology import ProcessGroups

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kept_modules(model: nn.Module, spec: models.ModelSpec, groups: ProcessGroups, partition: str) -> list[nn.Module]:
    """The modules this rank holds: its pipeline stage's blocks (cut as `build_pipeline` cuts them), or all."""
    topo = groups.topology
    if topo.pp == 1:
        return [model]
    blocks = spec.pipeline_blocks(model)
    bounds = stage_bounds(blocks, topo.pp, partition)
    stage = topo.coords(groups.rank)["pp"]
    return [b.module for b in blocks[bounds[stage]:bounds[stage + 1]]]


def parallelize(model: nn.Module, arch: str, groups: ProcessGroups, *, seed: int | None = None,
                sequence_parallel: bool = False, partition: str = "parameters",
                activation_checkpointing: bool = False) -> tuple[nn.Module, LossFn]:
    """Returns (module to hand to `build_engine`, loss function over its outputs). Collective.
    A meta-device `model` needs the `seed` its weights are drawn from."""
    spec = models.get_spec(arch)
    topo = groups.topology
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and seed is None:
        raise ValueError("parallelize: a model on the meta device needs the seed to initialise it from")
    rules = model.init_rules() if on_meta else None  # from the full shapes, before anything is cut
    loss_fn: LossFn = lm_loss
    lse = logsumexp
    if topo.tp > 1:
        if spec.tp_plan is None:
            raise ValueError(f"model arch {arch!r} declares no tensor-parallel plan; tp must be 1")
        apply_tensor_parallel(model, spec.tp_plan, groups["tp"], sequence_parallel=sequence_parallel)
        loss_fn, lse = vocab_parallel_loss(groups["tp"]), vocab_parallel_logsumexp(groups["tp"])
    elif sequence_parallel:
        raise ValueError("sequence_parallel shards activations over the TP group: it needs tp > 1")
    if topo.cp > 1:
        if spec.cp_core is None:
            raise ValueError(f"model arch {arch!r} declares no context-parallel core; cp must be 1")
        if not apply_context_parallel(model, spec.cp_core, groups["cp"]):
            raise ValueError(f"model arch {arch!r} has no layer matching its context-parallel core {spec.cp_core!r}")
    if topo.ep > 1:
        if spec.expert_bank is None:
            raise ValueError(f"model arch {arch!r} declares no expert bank; ep must be 1")
        if not apply_expert_parallel(model, spec.expert_bank, groups):
            raise ValueError(f"model arch {arch!r} has no module matching its expert bank {spec.expert_bank!r}")
    if on_meta:
        if topo.pp > 1 and spec.pipeline_blocks is None:
            raise ValueError(f"model arch {arch!r} declares no pipeline blocks; pp must be 1")
        materialize(model, _kept_modules(model, spec, groups, partition), rules, seed,
                    tp_group=groups["tp"] if topo.tp > 1 else None, ep_group=groups["ep"] if topo.ep > 1 else None)
    aux_loss = functools.partial(spec.aux_loss, model.cfg) if spec.aux_loss is not None else None
    z_loss = spec.z_loss(model.cfg) if spec.z_loss is not None else 0.0
    loss = ModelLoss(loss_fn, aux_loss, z_loss, lse)  # one loss (and one record of aux terms) for every layout
    if topo.pp > 1:
        if spec.pipeline_blocks is None:
            raise ValueError(f"model arch {arch!r} declares no pipeline blocks; pp must be 1")
        model = build_pipeline(model, spec.pipeline_blocks(model), topo, loss, partition=partition,
                               activation_checkpoint_interval=1 if activation_checkpointing else 0)
    return model, loss
