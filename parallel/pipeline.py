"""Pipeline parallelism: a DeepSpeed `PipelineModule` built from a model's ordered block list.

The model is built (and TP-sharded) at full size first, so every layout starts from the same
weights; each stage then keeps the blocks it owns. Blocks sharing a `tie` key become one
`TiedLayerSpec`: the shared module lives on every stage that uses it and DeepSpeed sums its
gradients across them. A block may return `(x, aux)`; the running aux loss travels with the
activations (summed block by block) and becomes a loss term on the last stage.

Parameters keep their single-process names: `canonical_parameters` maps a pipeline's
`<layer>.<...>` names back, which checkpoints, exports and the layout harness rely on.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from models.registry import PipeBlock
from parallel.distributed import skip_cpu_shm_build
from parallel.step import ModelLoss
from parallel.topology import Topology

PARTITION_METHODS = ("parameters", "uniform")


def block_weights(blocks: list[PipeBlock]) -> list[int]:
    return [sum(p.numel() for p in b.module.parameters()) for b in blocks]


def stage_bounds(blocks: list[PipeBlock], pp: int, method: str = "parameters") -> list[int]:
    """Block index where each stage starts, plus the end: stage s owns blocks[bounds[s]:bounds[s+1]]."""
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    if method not in PARTITION_METHODS:
        raise ValueError(f"pipeline partition {method!r} unknown; allowed: {', '.join(PARTITION_METHODS)}")
    if len(blocks) < pp:
        raise ValueError(f"pp={pp} needs at least {pp} pipeline blocks; the model has {len(blocks)}")
    if method == "uniform":
        bounds = partition_uniform(len(blocks), pp)
    else:
        bounds = partition_balanced(block_weights(blocks), pp)
    bounds = [int(b) for b in bounds]
    if any(bounds[s] >= bounds[s + 1] for s in range(pp)):  # a degenerate balance: fall back to equal counts
        bounds = [int(b) for b in partition_uniform(len(blocks), pp)]
    return bounds


def _run(fn: Callable | None, module: nn.Module, inputs):  # noqa: ANN001, ANN202 - tensor or (tensor, aux)
    x, aux = inputs if isinstance(inputs, tuple) else (inputs, None)
    out = fn(module, x) if fn is not None else module(x)
    if isinstance(out, tuple):
        out, extra = out
        aux = extra if aux is None else aux + extra
    out = out.contiguous()  # it may cross to the next stage, and p2p sends need contiguous tensors
    return out if aux is None else (out, aux)


class _Block(nn.Module):
    """One untied block as a pipeline layer."""

    def __init__(self, module: nn.Module, fn: Callable | None = None):
        super().__init__()
        self.block, self.fn = module, fn

    def forward(self, inputs):  # noqa: ANN001, ANN201
        return _run(self.fn, self.block, inputs)


class _Held(nn.Module):
    """Holds an already-built shared module: `TiedLayerSpec` wants a class to call."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.block = module


def _run_tied(fn: Callable | None, held: _Held, inputs):  # noqa: ANN001, ANN202
    return _run(fn, held.block, inputs)


def build_pipeline(model: nn.Module, blocks: list[PipeBlock], topology: Topology, loss_fn: ModelLoss, *,
                   partition: str = "parameters", activation_checkpoint_interval: int = 0) -> nn.Module:
    """A `PipelineModule` over `blocks` (which must compute `model`'s forward); collective. The aux that
    travels with the activations becomes `loss_fn.aux_loss(aux)` on the last stage."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    # PipelineModule talks through deepspeed.comm before `deepspeed.initialize` would set it up: adopt our group.
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False,
                               dist_init_required=False)
    bounds = stage_bounds(blocks, topology.pp, partition)
    layers: list = []
    for b in blocks:
        if b.tie is None:
            layers.append(_Block(b.module, b.forward))
        else:
            attrs = [f"block.{n}" for n, _ in b.module.named_parameters()]
            layers.append(TiedLayerSpec(b.tie, _Held, b.module, forward_fn=functools.partial(_run_tied, b.forward),
                                        tied_weight_attr=attrs))

    class _Pipe(PipelineModule):
        def _partition_layers(self, method: str = "parameters") -> None:  # our bounds, one source of truth
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    pipe = _Pipe(layers, topology=topology.to_deepspeed(), loss_fn=loss_fn, partition_method=partition,
                 activation_checkpoint_interval=activation_checkpoint_interval, activation_checkpoint_func=checkpoint)
    names = {id(p): n for n, p in model.named_parameters()}
    pipe.canonical_names = {n: names[id(p)] for n, p in pipe.named_parameters()}
    return pipe


def canonical_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(single-process name, parameter) for a plain or a pipeline module (its stage's parameters only)."""
    mapping = getattr(module, "canonical_names", None)
    for name, p in module.named_parameters():
        yield (mapping[name] if mapping is not None else name), p


def is_pipeline(module: nn.Module) -> bool:
    from deepspeed.pipe import PipelineModule

    return isinstance(module, PipelineModule)
