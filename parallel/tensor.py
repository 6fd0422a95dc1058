"""Megatron-style tensor and sequence parallelism on plain tensors: explicit autograd collectives,
column- and row-parallel linears, a vocab-parallel embedding and a vocab-parallel cross-entropy.

Layers are made from full-size, already initialised modules by slicing (`from_full`), so every
layout starts from the same weights as one process.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _rank_world(group) -> tuple[int, int]:  # noqa: ANN001 - a torch ProcessGroup
    return dist.get_rank(group), dist.get_world_size(group)


SEQ_DIM = 1  # activations are [batch, seq, ...]: sequence parallel shards dim 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    world = dist.get_world_size(group)
    src = x.movedim(SEQ_DIM, 0).contiguous()
    out = src.new_empty((world * src.shape[0], *src.shape[1:]))
    dist.all_gather_single(out, src, group=group)
    return out.movedim(0, SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    world = dist.get_world_size(group)
    src = x.movedim(SEQ_DIM, 0).contiguous()
    if src.shape[0] % world:
        raise ValueError(f"sequence length {src.shape[0]} is not divisible by tp={world} (sequence parallel)")
    out = src.new_empty((src.shape[0] // world, *src.shape[1:]))
    dist.reduce_scatter_tensor(out, src, group=group)
    return out.movedim(0, SEQ_DIM)


def _identity(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001, ARG001
    return x


def _all_gather_dim1(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _split_dim1(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    rank, world = _rank_world(group)
    return x.chunk(world, dim=1)[rank].contiguous()


def _conjugate_pair(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function running collective `forward` on the input and its conjugate `backward` on the gradient."""
    def fwd(ctx, x, group):  # noqa: ANN001, ANN202
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):  # noqa: ANN001, ANN202
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# Megatron's four region boundaries: the input of a column-parallel layer (copy / all-gather the
# sequence) and the output of a row-parallel layer (all-reduce / reduce-scatter to sequence shards).
_CopyToTP = _conjugate_pair("_CopyToTP", _identity, _all_reduce)
_ReduceFromTP = _conjugate_pair("_ReduceFromTP", _all_reduce, _identity)
_GatherFromSP = _conjugate_pair("_GatherFromSP", _all_gather_seq, _reduce_scatter_seq)
_ReduceScatterToSP = _conjugate_pair("_ReduceScatterToSP", _reduce_scatter_seq, _all_gather_seq)
# Leaving a TP region into replicated math (e.g. a regulariser over every head): each rank's gradient
# of the gathered tensor is the same, so its slice is its shard's whole gradient.
_GatherToReplicated = _conjugate_pair("_GatherToReplicated", _all_gather_dim1, _split_dim1)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    return _ReduceFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    return _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    return _ReduceScatterToSP.apply(x, group)


def gather_to_replicated(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """All-gather head-sharded `x` on dim 1 for replicated use; the backward keeps this rank's slice."""
    return _GatherToReplicated.apply(x, group)


def mark_sequence_parallel(p: nn.Parameter, group) -> nn.Parameter:  # noqa: ANN001
    """A replicated parameter used on a sequence shard (a norm's gain) gets a partial gradient on each
    TP rank: sum it over the TP group as it is produced, before DeepSpeed accumulates or reduces it."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad
    p.register_hook(hook)
    p.sequence_parallel = True
    p.sequence_parallel_group = group  # a parameter materialised later gets the same hook again (materialize.py)
    return p


def mark_sharded(p: nn.Parameter, dim: int) -> nn.Parameter:
    """Tag a TP-sharded parameter: DeepSpeed (`model_parallel`, `tensor_model_parallel`) then counts
    it on every TP rank in the gradient norm, replicated ones once; `tp_shard_dim` says how to gather it."""
    p.model_parallel = p.tensor_model_parallel = True
    p.tp_shard_dim = dim
    return p


def shard(t: torch.Tensor, dim: int, group) -> torch.Tensor:  # noqa: ANN001
    rank, world = _rank_world(group)
    if t.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by tp={world}")
    return t.chunk(world, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T: the output features are split over the TP ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False):  # noqa: ANN001
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark_sharded(nn.Parameter(weight), 0)
        self.bias = mark_sharded(nn.Parameter(bias), 0) if bias is not None else None

    @classmethod
    def from_full(cls, full: nn.Linear, group, sequence_parallel: bool = False) -> "ColumnParallelLinear":  # noqa: ANN001
        bias = shard(full.bias.data, 0, group) if full.bias is not None else None
        return cls(shard(full.weight.data, 0, group), bias, group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x_local W_local^T: the input features are split, outputs all-reduced."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False):  # noqa: ANN001
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark_sharded(nn.Parameter(weight), 1)
        self.bias = nn.Parameter(bias) if bias is not None else None  # replicated, added once after the reduction
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias, group)

    @classmethod
    def from_full(cls, full: nn.Linear, group, sequence_parallel: bool = False) -> "RowParallelLinear":  # noqa: ANN001
        bias = full.bias.data.clone() if full.bias is not None else None
        return cls(shard(full.weight.data, 1, group), bias, group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Each TP rank holds a contiguous slice of the vocabulary; rows it does not hold contribute zero."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group, sequence_parallel: bool = False):  # noqa: ANN001
        super().__init__()
        self.group, self.vocab_start, self.sequence_parallel = group, vocab_start, sequence_parallel
        self.weight = mark_sharded(nn.Parameter(weight), 0)

    @classmethod
    def from_full(cls, full: nn.Embedding, group, sequence_parallel: bool = False) -> "VocabParallelEmbedding":  # noqa: ANN001
        rank, world = _rank_world(group)
        rows = shard(full.weight.data, 0, group)
        return cls(rows, rank * rows.shape[0], group, sequence_parallel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        # Under sequence parallelism the residual stream starts sharded: reduce-scatter instead of all-reduce.
        return reduce_scatter_to_sp(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over logits split on the vocabulary: only [tokens] scalars cross ranks."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):  # noqa: ANN001
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - vocab_start
        mine = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(target_logit, group=group)
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, mine)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        softmax, idx, mine = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        return g * (grad / idx.numel()), None, None, None


class _VocabParallelLogSumExp(torch.autograd.Function):
    """log Σ exp over logits split on the vocabulary (fp32); the backward is local (softmax of the shard)."""

    @staticmethod
    def forward(ctx, logits, group):  # noqa: ANN001
        logits = logits.float()
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (logits - m.unsqueeze(-1)).exp().sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        lse = m + sum_exp.log()
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        logits, lse = ctx.saved_tensors
        return (logits - lse.unsqueeze(-1)).exp() * grad.unsqueeze(-1), None


def vocab_parallel_logsumexp(group):  # noqa: ANN001
    """A logsumexp over the last dim for vocab-sharded logits: equals torch.logsumexp of the full logits."""
    def lse(logits: torch.Tensor) -> torch.Tensor:
        return _VocabParallelLogSumExp.apply(logits, group)
    return lse


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> torch.Tensor:  # noqa: ANN001
    """Equals F.cross_entropy(full_logits.flatten(0, -2), targets.flatten()) without gathering the logits."""
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group)


def gather_full(p: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """The full tensor of a (possibly) TP-sharded parameter; collective over the TP group."""
    dim = getattr(p, "tp_shard_dim", None)
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def vocab_parallel_loss(group):  # noqa: ANN001
    """An `lm_loss`-shaped function for vocab-sharded logits (the TP head)."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, dist.get_rank(group) * logits.shape[-1], group)
    return loss
