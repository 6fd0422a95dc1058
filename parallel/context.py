"""Context parallelism for chunked DeltaNet (spec: ../shared/specs/deltanet.md §6; LASP-2 with a K×K transition).

Each of P ranks holds a contiguous slice of the token stream. A slice maps the state coming in to
the state going out affinely, S_out = M_r S_in + E_r, so one all-gather of every rank's fp32
summary [M_r | E_r] ([B, H, K, K+V], independent of the sequence length) lets rank r fold the
summaries of the ranks before it (back to where its first sequence started) into the initial
state of its ordinary local chunked pass. [M | E] is itself a delta-rule final state: run the
slice with values [0 | v] from the initial state [I | 0]. The short convs read a (W−1)-row halo of
the previous rank's projections.

Gradients flow through both exchanges by autograd: an all-gather's backward is a reduce-scatter,
which hands each summary (and halo) owner the sum of what later ranks needed of it. Every rank
runs the same collectives in the same order, forward and backward: the summary always depends
on the local keys (so the halo's backward waits for the summary's) and every gathered tensor is
used, if only times zero, so no rank skips a backward collective. Ranks build the same graph, so
DeepSpeed's gradient hooks (ZeRO-2 reduces buckets during backward) fire in the same order too.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kernels.delta_rule import chunk_delta_rule
from models.layers.delta_net import DeltaRuleCore
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


class ContextParallelDeltaRule(DeltaRuleCore):
    """A `DeltaRuleCore` whose instance was re-classed by `apply_context_parallel` (as torch's FSDP2
    does): same parameters, same names; `cu_seqlens` given to it are global."""

    cp_group = None

    def forward(self, q, k, v, beta, g=None, cu_seqlens=None):  # noqa: ANN001, ANN201 - DeltaRuleCore.forward
        self._rank, self._world = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
        self._meta = slice_meta(cu_seqlens, q.shape[1], self._rank, self._world)
        return super().forward(q, k, v, beta, g, self._meta.local_cu)

    def _left_context(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.q_conv.width - 1
        T = xs[0].shape[1]
        if T < n:
            raise ValueError(f"context parallel: {T} tokens per rank, the short conv needs at least {n}")
        # one exchange for q, k and v together: a single backward collective per layer
        halo = gather_from_sp(torch.cat([x[:, -n:] for x in xs], dim=-1).contiguous(), self.cp_group)  # [B, P·n, ΣC]
        prev = max(self._rank - 1, 0)  # rank 0 reads its own rows, all masked out: the gradient path stays uniform
        pos = torch.arange(self._rank * T - n, self._rank * T, device=halo.device)
        valid = (pos >= self._meta.first_start) & (pos >= 0)
        return halo[:, prev * n:(prev + 1) * n], torch.where(valid, 0, -1)  # id 0: this slice's first sequence

    def _delta_rule(self, q, k, v, beta, g, cu_seqlens):  # noqa: ANN001, ANN202 - chunk_delta_rule's tensors
        meta, r = self._meta, self._rank
        B, T, H, K = k.shape
        V = v.shape[-1]
        run = dict(chunk_size=self.chunk_size, backend=self.backend)
        a = meta.last_start
        if meta.last_continues:
            sd = torch.promote_types(k.dtype, torch.float32)  # fp32 summaries (float64 for float64 inputs)
            eye = torch.eye(K, dtype=sd, device=k.device).expand(B, H, K, K)
            start = torch.cat([eye, eye.new_zeros(B, H, K, V)], dim=-1)
            tail_v = torch.cat([v.new_zeros(B, T - a, H, K), v[:, a:]], dim=-1)
            _, summary = chunk_delta_rule(k[:, a:], k[:, a:], tail_v, beta[:, a:], g=None if g is None else g[:, a:],
                                          initial_state=start, output_final_state=True, **run)
        else:  # nobody reads it; tied to k so the halo's backward still waits for this exchange's
            summary = k.new_zeros(B, H, K, K + V, dtype=torch.promote_types(k.dtype, torch.float32)) + 0 * k[:, -1:].sum()
        gathered = gather_from_sp(summary[:, None].contiguous(), self.cp_group)  # [B, P, H, K, K+V]
        state = None
        for j in range(meta.first_start_rank, r):  # fp32, in rank order
            M, E = gathered[:, j, ..., :K], gathered[:, j, ..., K:]
            state = E if state is None else M @ state + E
        if state is not None and cu_seqlens is not None and len(cu_seqlens) > 2:
            state = torch.cat([state, state.new_zeros(len(cu_seqlens) - 2, H, K, V)])  # later local sequences: 0
        o, _ = chunk_delta_rule(q, k, v, beta, g=g, initial_state=state, cu_seqlens=cu_seqlens, **run)
        if state is None:
            o = o + 0 * gathered.sum().to(o.dtype)  # keep this rank in the backward reduce-scatter
        return o


def apply_context_parallel(model: nn.Module, core_pattern: str, group) -> int:  # noqa: ANN001
    """Swap every delta-rule core matching `core_pattern` for its context-parallel version; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if fnmatch.fnmatchcase(name, core_pattern):
            if not isinstance(module, DeltaRuleCore):
                raise ValueError(f"context parallel: {name} is a {type(module).__name__}, not a delta-rule core")
            module.__class__ = ContextParallelDeltaRule
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
