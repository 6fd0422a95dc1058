"""Apply a model's tensor-parallel plan: swap the named submodules for their sharded versions.

A plan maps submodule-name patterns (fnmatch) to a style (`parallel/tp_styles.py`: a built-in name or
a `TPStyle` object). Weights are sliced from the full-size module, so a sharded model starts exactly
where the single-device one does. `matched_styles` is the one pattern matching, shared with the
planner (`plan.tp_shard_sizes`), which counts with the same style objects.

With `sequence_parallel`, the residual stream between the TP regions is sharded on the sequence:
colwise layers all-gather their input, rowwise layers and the embedding reduce-scatter their
output, and every parameter the plan leaves replicated (norm gains, rowwise biases: everything a
Megatron-style plan leaves outside the TP regions) gets its partial gradient summed over TP.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

from parallel.tensor import mark_sequence_parallel
from parallel.tp_styles import TPStyle, resolve

TPPlan = dict[str, "str | TPStyle"]


def style_of(plan: TPPlan, name: str) -> TPStyle | None:
    hits = [style for pattern, style in plan.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(hits) > 1:
        raise ValueError(f"tensor-parallel plan matches {name!r} more than once")
    return resolve(hits[0]) if hits else None


def matched_styles(model: nn.Module, plan: TPPlan) -> Iterator[tuple[str, nn.Module, TPStyle]]:
    """(name, module, style) of every submodule the plan names, in module order."""
    for style in plan.values():
        resolve(style)  # an unknown name fails before anything is touched
    for name, module in list(model.named_modules()):
        style = style_of(plan, name)
        if style is not None:
            yield name, module, style


def has_region_styles(plan: TPPlan | None) -> bool:
    return any(resolve(s).region for s in (plan or {}).values())


def apply_tensor_parallel(model: nn.Module, plan: TPPlan, group, sequence_parallel: bool = False) -> nn.Module:  # noqa: ANN001
    """In place; returns the model. Tied weights (embedding and head) stay tied."""
    shared = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            shared.setdefault(id(module.weight), []).append(name)
    swapped = {}
    for name, module, style in list(matched_styles(model, plan)):
        new = style.apply(module, group, sequence_parallel)
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
