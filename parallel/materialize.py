"""Materialise a meta-device model on this rank: only the parameters it keeps, each its slice of the
full-size tensor that one process would initialise (models/init.py: a function of seed, canonical
name and full shape).

The model is built on the meta device and sharded there (TP styles, expert-parallel banks and pipeline
stages only change shapes and record how each parameter was cut: `tp_shard_dim`, `ep_shard_dim`).
Each kept parameter is then filled at full size on the host, sliced like the real shard, and the full
tensor dropped before the next one: peak host memory is this rank's share plus the largest parameter.
A meta parameter cannot take host data in place, so each becomes a new `nn.Parameter` carrying the
old one's attributes (and the sequence-parallel gradient hook, re-registered from them), swapped into
every module that held the old one (tied weights stay tied).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from models.init import Fill, fill_parameter, init_buffers
from parallel.tensor import mark_sequence_parallel


def _degree(group) -> tuple[int, int]:  # noqa: ANN001
    return (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)


def _cuts(p: torch.Tensor, tp_group, ep_group) -> list[tuple[int, int, int]]:  # noqa: ANN001
    """(dim, rank, world) of each way `p` was cut, in the order the swaps applied them: TP, then experts."""
    out = []
    if getattr(p, "tp_shard_dim", None) is not None:
        out.append((p.tp_shard_dim, *_degree(tp_group)))
    if getattr(p, "ep_shard_dim", None) is not None:
        out.append((p.ep_shard_dim, *_degree(ep_group)))
    return out


def _local_value(p: torch.Tensor, name: str, rules: dict[str, Fill], seed: int, tp_group, ep_group) -> torch.Tensor:  # noqa: ANN001
    cuts = _cuts(p, tp_group, ep_group)
    shape = list(p.shape)
    for dim, _, world in cuts:
        shape[dim] *= world
    full = torch.empty(shape, dtype=p.dtype)
    fill_parameter(rules, name, full, seed)
    local = full
    for dim, rank, world in cuts:
        local = local.chunk(world, dim=dim)[rank]
    return local.clone() if cuts else full


@functools.cache
def _malloc_trim():  # noqa: ANN202 - glibc's malloc_trim, or None elsewhere
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed() -> None:
    """Hand the freed full-size tensor's pages back to the OS: glibc keeps freed chunks below its (growing)
    mmap threshold in the heap, where holes of one parameter's size would add up over hundreds of them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _swap(modules: Iterable[nn.Module], old: nn.Parameter, new: nn.Parameter) -> None:
    for m in modules:
        for key, p in m._parameters.items():
            if p is old:
                m._parameters[key] = new


@torch.no_grad()
def materialize(model: nn.Module, keep: list[nn.Module], rules: dict[str, Fill], seed: int, *,
                tp_group=None, ep_group=None) -> None:  # noqa: ANN001
    """Give every meta parameter and buffer under the `keep` modules of `model` its host value.
    `rules` are keyed by the canonical (single-process) names, which `model.named_parameters()` still
    gives after sharding."""
    names = {id(p): n for n, p in model.named_parameters()}
    every = list(model.modules())
    kept = {id(p): p for k in keep for p in k.parameters()}
    for p in kept.values():
        if not p.is_meta:
            continue
        new = nn.Parameter(_local_value(p, names[id(p)], rules, seed, tp_group, ep_group), requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)
        if getattr(p, "sequence_parallel_group", None) is not None:
            mark_sequence_parallel(new, p.sequence_parallel_group)
        _swap(every, p, new)
        _release_freed()
    for k in keep:
        for m in k.modules():
            for key, b in m._buffers.items():
                if b is not None and b.is_meta:
                    m._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
        init_buffers(k)
