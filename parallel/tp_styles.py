"""Tensor-parallel styles: one object per way of splitting a module, used both to shard it
(`apply_tp.apply_tensor_parallel`) and to count what a rank holds (`plan.tp_shard_sizes`).

A style says which of a module's own parameters are split on which dim (`sharded_dims`); from that
one declaration come the shard (`apply`) and the per-rank sizes the planner reports (`local_sizes`),
so the two cannot drift apart. An architecture names a built-in style in its TP plan by string, or
passes its own `TPStyle` instance.

Built-in styles: `colwise` and `rowwise` linears, `vocab` for the embedding, `headwise` for a module
inside a TP region whose every parameter is indexed by the local channels/heads on dim 0 (a depthwise
conv, per-head decay parameters: sliced like the colwise output before it, no collective), and
`partial` for a replicated module applied to head-sharded activations (a per-head output norm: each
rank's gradient covers its heads only, so it is summed over TP). The output head is `colwise` on the
vocabulary: its logits stay sharded and the loss is `vocab_parallel_cross_entropy`.

Two region styles wrap a whole module whose math splits by heads or by hidden width (mixture-of-
experts layers, where no single linear marks the region's boundary): its floating-point inputs are
copied into the TP region (identity forward, all-reduce backward), its first output is a partial sum
(all-reduced), and per-head tensors it returns in a list (router statistics, heads on dim 1) are
gathered for replicated use. `headwise_region` slices every direct parameter on dim 0 by whole heads;
`expert_hidden` splits an expert bank's hidden width (the dims its `expert_parameters()` declares).
Neither runs under sequence parallelism (`region = True`).

Three styles serve lookup tables split by output columns (MemoryFormer): `table_columns` (the output stays
column-sharded, e.g. a rank's own heads), `table_columns_gathered` (all-gathered) and `gathered_columns` for a
parameter-free module whose column-sharded output is gathered.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                             gather_to_replicated, mark_sequence_parallel, mark_sharded, reduce_from_tp, shard)


class ShardError(ValueError):
    """A parameter dimension a style splits is not divisible by the TP degree."""


class TPStyle:
    """How one module is split over the TP group. Subclasses declare `sharded_dims` and implement `apply`."""

    name = "custom"
    region = False  # a TP region around a whole module: refused under sequence parallelism

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        """Direct parameter name -> the dim split over TP ranks (parameters not named stay replicated)."""
        raise NotImplementedError

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        """This rank's version of the full-size `module` (in place or a new module)."""
        raise NotImplementedError

    def local_sizes(self, module: nn.Module, tp: int, path: str = "") -> dict[str, int]:
        """Direct parameter name -> elements one TP rank holds, for every parameter the style splits."""
        out = {}
        for pname, dim in self.sharded_dims(module).items():
            p = getattr(module, pname)
            if p.shape[dim] % tp:
                where = f"{path}.{pname}" if path else pname
                raise ShardError(f"{where} dimension {dim} ({p.shape[dim]}) is not divisible by tp={tp}")
            out[pname] = p.numel() // tp
        return out

    def __repr__(self) -> str:
        return f"<TP style {self.name}>"


def slice_parameters(module: nn.Module, dims: dict[str, int], group) -> nn.Module:  # noqa: ANN001
    """Replace each named parameter by this rank's slice on its dim, tagged as TP-sharded."""
    for pname, dim in dims.items():
        setattr(module, pname, mark_sharded(nn.Parameter(shard(getattr(module, pname).data, dim, group)), dim))
    return module


class Colwise(TPStyle):
    name = "colwise"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, **({"bias": 0} if getattr(module, "bias", None) is not None else {})}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        return ColumnParallelLinear.from_full(module, group, sequence_parallel)


class Rowwise(TPStyle):
    name = "rowwise"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 1}  # the bias is replicated, added once after the reduction

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        return RowParallelLinear.from_full(module, group, sequence_parallel)


class Vocab(TPStyle):
    name = "vocab"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        return VocabParallelEmbedding.from_full(module, group, sequence_parallel)


class Headwise(TPStyle):
    name = "headwise"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {n: 0 for n, _ in module.named_parameters(recurse=False)}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        return slice_parameters(module, self.sharded_dims(module), group)


class Partial(TPStyle):
    name = "partial"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        for p in module.parameters():
            mark_sequence_parallel(p, group)  # the same TP sum of a partial gradient
        return module


def enter_region(module: nn.Module, group) -> None:  # noqa: ANN001
    """Hooks making `module` a TP region: inputs copied in, the first output all-reduced, per-head
    statistics returned in a list gathered for replicated use."""
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


class Region(TPStyle):
    """A TP region whose parameters `sharded_dims` declares (subclasses say which)."""

    region = True

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        if sequence_parallel:
            raise ValueError(f"{type(module).__name__}: region styles do not run under sequence parallelism")
        enter_region(module, group)
        return slice_parameters(module, self.sharded_dims(module), group)


class HeadwiseRegion(Region):
    name = "headwise_region"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return Headwise().sharded_dims(module)


class ExpertHidden(Region):
    name = "expert_hidden"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return dict(module.expert_parameters())  # an expert bank (models.contract.ExpertBank)


def gather_columns(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """[..., h/t] column shards -> [..., h] (rank order); the backward keeps this rank's columns."""
    return gather_to_replicated(x.movedim(-1, 1), group).movedim(1, -1)


class TableColumns(TPStyle):
    """A lookup module (MemoryFormer's Memory Layer) whose `tables` [rows, h] and `bias` [h] are split by output
    columns: a rank gathers the same rows as one process (its inputs — row indices and their weights — are
    replicated) and holds 1/t of every row. Floating inputs enter through copy-to-TP, whose backward sums each
    rank's partial gradient (its columns' share of ⟨∂y, T[idx]⟩); with `gather_output` the output is all-gathered."""

    def __init__(self, gather_output: bool):
        self.gather_output = gather_output
        self.name = "table_columns_gathered" if gather_output else "table_columns"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {"tables": 1, **({"bias": 0} if getattr(module, "bias", None) is not None else {})}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        if sequence_parallel:
            raise ValueError(f"{type(module).__name__}: table styles do not run under sequence parallelism")

        def enter(mod: nn.Module, args: tuple) -> tuple:
            return tuple(copy_to_tp(a, group) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        module.register_forward_pre_hook(enter)
        if self.gather_output:
            module.register_forward_hook(lambda mod, args, out: gather_columns(out, group))
        return slice_parameters(module, self.sharded_dims(module), group)


class GatheredColumns(TPStyle):
    """A parameter-free module whose output is this rank's column shard (heads with no W_O after them): all-gathered."""

    name = "gathered_columns"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001
        if sequence_parallel:
            raise ValueError(f"{type(module).__name__}: gathered_columns does not run under sequence parallelism")
        module.register_forward_hook(lambda mod, args, out: gather_columns(out, group))
        return module


STYLES: dict[str, TPStyle] = {s.name: s for s in (Colwise(), Rowwise(), Vocab(), Headwise(), Partial(),
                                                   HeadwiseRegion(), ExpertHidden(), TableColumns(False),
                                                   TableColumns(True), GatheredColumns())}


def resolve(style: str | TPStyle) -> TPStyle:
    if isinstance(style, TPStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown tensor-parallel style {style!r}; allowed: {', '.join(STYLES)} or a TPStyle")
    return STYLES[style]
