"""Apply a model's tensor-parallel plan: swap the named submodules for their sharded versions.

A plan maps submodule-name patterns (fnmatch) to a style: `colwise` and `rowwise` linears,
`vocab` for the embedding, `headwise` for a module inside a TP region whose every parameter is
indexed by the local channels/heads on dim 0 (a depthwise conv, per-head decay parameters: sliced
like the colwise output before it, no collective), and `partial` for a replicated module applied to
head-sharded activations (a per-head output norm: each rank's gradient covers its heads only, so
it is summed over TP). The output head is `colwise` on the vocabulary: its logits stay sharded
and the loss is `vocab_parallel_cross_entropy`. Weights are sliced from the full-size module, so
a sharded model starts exactly where the single-device one does.

Two region styles wrap a whole module whose math splits by heads or by hidden width (mixture-of-
experts layers, where no single linear marks the region's boundary): its floating-point inputs are
copied into the TP region (identity forward, all-reduce backward), its first output is a partial sum
(all-reduced), and per-head tensors it returns in a list (router statistics, heads on dim 1) are
gathered for replicated use. `headwise_region` slices every direct parameter on dim 0 by whole heads;
`expert_hidden` splits a two-layer expert bank's hidden width (`keys` [E, d, h] on dim 2, `values`
[E, h, d] on dim 1). Neither runs under sequence parallelism.

With `sequence_parallel`, the residual stream between the TP regions is sharded on the sequence:
colwise layers all-gather their input, rowwise layers and the embedding reduce-scatter their
output, and every parameter the plan leaves replicated (norm gains, rowwise biases: everything a
Megatron-style plan leaves outside the TP regions) gets its partial gradient summed over TP.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                             gather_to_replicated, mark_sequence_parallel, mark_sharded, reduce_from_tp, shard)

class _Headwise:
    @staticmethod
    def from_full(module: nn.Module, group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001, ARG004
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, mark_sharded(nn.Parameter(shard(p.data, 0, group)), 0))
        return module


class _Partial:
    @staticmethod
    def from_full(module: nn.Module, group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001, ARG004
        for p in module.parameters():
            mark_sequence_parallel(p, group)  # the same TP sum of a partial gradient
        return module


def _as_region(module: nn.Module, group, sequence_parallel: bool) -> None:  # noqa: ANN001
    if sequence_parallel:
        raise ValueError(f"{type(module).__name__}: region styles do not run under sequence parallelism")

    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def copy(t):  # noqa: ANN001, ANN202
            return copy_to_tp(t, group) if torch.is_tensor(t) and t.is_floating_point() else t
        return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

    def leave(mod: nn.Module, args: tuple, out):  # noqa: ANN001, ANN202
        if not isinstance(out, tuple):
            return reduce_from_tp(out, group)
        first, *rest = out
        rest = [[gather_to_replicated(t, group) for t in r] if isinstance(r, list) else r for r in rest]
        return (reduce_from_tp(first, group), *rest)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave)


class _HeadwiseRegion:
    @staticmethod
    def from_full(module: nn.Module, group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001
        _as_region(module, group, sequence_parallel)
        return _Headwise.from_full(module, group)


EXPERT_HIDDEN_DIMS = {"keys": 2, "values": 1}


class _ExpertHidden:
    @staticmethod
    def from_full(module: nn.Module, group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001
        _as_region(module, group, sequence_parallel)
        for name, dim in EXPERT_HIDDEN_DIMS.items():
            setattr(module, name, mark_sharded(nn.Parameter(shard(getattr(module, name).data, dim, group)), dim))
        return module


STYLES = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear, "vocab": VocabParallelEmbedding,
          "headwise": _Headwise, "partial": _Partial, "headwise_region": _HeadwiseRegion,
          "expert_hidden": _ExpertHidden}
REGION_STYLES = ("headwise_region", "expert_hidden")


def _style(plan: dict[str, str], name: str) -> str | None:
    hits = [style for pattern, style in plan.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(hits) > 1:
        raise ValueError(f"tensor-parallel plan matches {name!r} more than once")
    return hits[0] if hits else None


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001
    """In place; returns the model. Tied weights (embedding and head) stay tied."""
    for style in plan.values():
        if style not in STYLES:
            raise ValueError(f"unknown tensor-parallel style {style!r}; allowed: {', '.join(STYLES)}")
    shared = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            shared.setdefault(id(module.weight), []).append(name)
    swapped = {}
    for name, module in list(model.named_modules()):
        style = _style(plan, name)
        if style is None:
            continue
        new = STYLES[style].from_full(module, group, sequence_parallel)
        if new is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped[name] = new
    for names in shared.values():  # re-tie: both sides hold the same vocabulary rows
        if len(names) > 1 and all(n in swapped for n in names):
            for n in names[1:]:
                swapped[n].weight = swapped[names[0]].weight
    if sequence_parallel:
        for p in model.parameters():
            if not getattr(p, "tensor_model_parallel", False) and not getattr(p, "sequence_parallel", False):
                mark_sequence_parallel(p, group)
    return model
