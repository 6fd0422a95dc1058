"""Context parallelism for any core of the `models.contract.ContextParallelCore` protocol (chunked DeltaNet:
../shared/specs/deltanet.md §6, LASP-2 with a K×K transition; a diagonal recurrence such as Mamba's).

Each of P ranks holds a contiguous slice of the token stream. A slice maps the state coming in to
the state going out affinely, so one all-gather of every rank's fp32 summary (the delta rule's
[M_r | E_r], [B, H, K, K+V], independent of the sequence length) lets rank r fold the summaries of
the ranks before it (back to where its first sequence started) into the initial state of its
ordinary local pass. Short convs read a `halo`-row left context of the previous rank's inputs.

Gradients flow through both exchanges by autograd: an all-gather's backward is a reduce-scatter,
which hands each summary (and halo) owner the sum of what later ranks needed of it. Every rank
runs the same collectives in the same order, forward and backward: the summary always depends
on the local keys (so the halo's backward waits for the summary's) and every gathered tensor is
used, if only times zero, so no rank skips a backward collective. Ranks build the same graph, so
DeepSpeed's gradient hooks (ZeRO-2 reduces buckets during backward) fire in the same order too.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.contract import ContextParallelCore, Inputs
from parallel.tensor import gather_from_sp


@dataclass
class SliceMeta:
    """Where this rank's slice sits in the global stream of sequences."""

    local_cu: torch.Tensor | None  # local boundaries (None: one sequence per batch row, over every rank)
    first_start_rank: int  # the rank where this slice's first sequence starts (== rank: starts here)
    first_start: int  # global position where that sequence starts
    last_start: int  # local position where this slice's last sequence starts
    last_continues: bool  # this slice's last sequence goes on into the next rank


def slice_meta(cu_seqlens: torch.Tensor | None, length: int, rank: int, world: int) -> SliceMeta:
    """`cu_seqlens` are global (over world·length tokens); this rank holds [rank·length, (rank+1)·length)."""
    s0, e0 = rank * length, (rank + 1) * length
    if cu_seqlens is None:
        return SliceMeta(None, 0, 0, 0, rank < world - 1)
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != world * length:
        raise ValueError(f"cu_seqlens must run from 0 to {world * length} (cp={world} × {length} tokens), got {cu}")
    first = max(i for i in range(len(cu) - 1) if cu[i] <= s0)
    last = max(i for i in range(len(cu) - 1) if cu[i] <= e0 - 1)
    local = sorted({0, length, *(c - s0 for c in cu if s0 < c < e0)})
    return SliceMeta(torch.tensor(local, dtype=cu_seqlens.dtype, device=cu_seqlens.device),
                     cu[first] // length, cu[first], max(cu[last] - s0, 0), cu[last + 1] > e0)


class ContextParallel:
    """Mixed into a context-parallel core's class by `apply_context_parallel` (the instance is re-classed,
    as torch's FSDP2 does): same parameters, same names; `cu_seqlens` given to it are global. Replaces
    the core's two hooks: `left_context` reads the previous rank's last rows, `recurrence` folds the
    earlier ranks' summaries into this slice's initial state."""

    cp_group = None

    def forward(self, *inputs, cu_seqlens=None):  # noqa: ANN001, ANN002, ANN201 - the core's own forward
        self._rank, self._world = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
        self._meta = slice_meta(cu_seqlens, inputs[0].shape[1], self._rank, self._world)
        return super().forward(*inputs, cu_seqlens=self._meta.local_cu)

    def left_context(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n = self.halo
        if n == 0:
            return None, None
        T = xs[0].shape[1]
        if T < n:
            raise ValueError(f"context parallel: {T} tokens per rank, the core needs a halo of {n}")
        # one exchange for every input together: a single backward collective per layer
        halo = gather_from_sp(torch.cat([x[:, -n:] for x in xs], dim=-1).contiguous(), self.cp_group)  # [B, P·n, ΣC]
        prev = max(self._rank - 1, 0)  # rank 0 reads its own rows, all masked out: the gradient path stays uniform
        pos = torch.arange(self._rank * T - n, self._rank * T, device=halo.device)
        valid = (pos >= self._meta.first_start) & (pos >= 0)
        return halo[:, prev * n:(prev + 1) * n], torch.where(valid, 0, -1)  # id 0: this slice's first sequence

    def recurrence(self, inputs: Inputs, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        meta, r = self._meta, self._rank
        a = meta.last_start
        if meta.last_continues:
            summary = self.summarize(tuple(None if t is None else t[:, a:] for t in inputs))
        else:  # nobody reads it (zero_summary ties it to the inputs, so the backward collectives stay in step)
            summary = self.zero_summary(inputs)
        gathered = gather_from_sp(summary[:, None].contiguous(), self.cp_group)  # [B, P, ...summary]
        state = None
        for j in range(meta.first_start_rank, r):  # fp32, in rank order
            state = self.fold(gathered[:, j], state)
        if state is not None and cu_seqlens is not None and len(cu_seqlens) > 2:
            state = torch.cat([state, state.new_zeros(len(cu_seqlens) - 2, *state.shape[1:])])  # later local sequences: 0
        o = self.scan(inputs, state, cu_seqlens)
        if state is None:
            o = o + 0 * gathered.sum().to(o.dtype)  # keep this rank in the backward reduce-scatter
        return o


@functools.cache
def _context_parallel_class(cls: type) -> type:
    return type(f"ContextParallel{cls.__name__}", (ContextParallel, cls), {})


def apply_context_parallel(model: nn.Module, core_pattern: str, group) -> int:  # noqa: ANN001
    """Swap every core matching `core_pattern` for its context-parallel version; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if fnmatch.fnmatchcase(name, core_pattern):
            if not isinstance(module, ContextParallelCore):
                raise ValueError(f"context parallel: {name} is a {type(module).__name__}, which does not implement "
                                 "the context-parallel core protocol (models.contract.ContextParallelCore)")
            module.__class__ = _context_parallel_class(type(module))
            module.cp_group = group
            n += 1
    return n


def context_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of packed samples [B, T+1] (inputs are the first T tokens, targets the last T):
    tokens [rank·L, (rank+1)·L + 1), so `split_batch` gives its L inputs and their L targets."""
    L, rem = divmod(batch.shape[1] - 1, world)
    if rem:
        raise ValueError(f"sequence length {batch.shape[1] - 1} is not divisible by cp={world}")
    return batch[:, rank * L:(rank + 1) * L + 1]
