"""Turn a full-size single-device model into this rank's part of the layout: TP/SP, CP, EP, then PP.

The one place that reads a model's registration (TP plan, pipeline blocks) and the topology, so
the worker, the layout harness and the benchmarks build every layout the same way.
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
from parallel.pipeline import build_pipeline
from parallel.step import lm_loss, with_aux_loss
from parallel.tensor import vocab_parallel_loss
from parallel.topology import ProcessGroups

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parallelize(model: nn.Module, arch: str, groups: ProcessGroups, *, sequence_parallel: bool = False,
                partition: str = "parameters", activation_checkpointing: bool = False) -> tuple[nn.Module, LossFn]:
    """Returns (module to hand to `build_engine`, loss function over its outputs). Collective."""
    spec = models.get_spec(arch)
    topo = groups.topology
    loss_fn: LossFn = lm_loss
    if topo.tp > 1:
        if spec.tp_plan is None:
            raise ValueError(f"model arch {arch!r} declares no tensor-parallel plan; tp must be 1")
        apply_tensor_parallel(model, spec.tp_plan, groups["tp"], sequence_parallel=sequence_parallel)
        loss_fn = vocab_parallel_loss(groups["tp"])
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
    aux_loss = functools.partial(spec.aux_loss, model.cfg) if spec.aux_loss is not None else None
    loss = with_aux_loss(loss_fn, aux_loss)  # one function (and one record of aux terms) for every layout
    if topo.pp > 1:
        if spec.pipeline_blocks is None:
            raise ValueError(f"model arch {arch!r} declares no pipeline blocks; pp must be 1")
        model = build_pipeline(model, spec.pipeline_blocks(model), topo, loss, partition=partition,
                               activation_checkpoint_interval=1 if activation_checkpointing else 0,
                               aux_loss=aux_loss)
    return model, loss
