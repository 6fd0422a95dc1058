"""Expert parallelism for dropless MoE (spec: ../shared/specs/moeut.md §4; megablocks' parallel forward).

`apply_expert_parallel` re-classes each expert bank (any module of the `models.contract.ExpertBank` protocol,
as `parallel/context.py` does with context-parallel cores) and keeps its contiguous block of E/ep experts. Per call: a routing plan on
global expert ids, one exchange of the per-expert counts, the rows in expert order sent with a
variable-split all-to-all (its backward is the reverse exchange), a local plan over the received rows,
the bank's own local compute (`expert_forward`: MoEUT's grouped matmuls), and the reverse all-to-all home, where the gated scatter sums each row's
choices in a fixed order.

Gradients follow DeepSpeed's MoE conventions, so its engine and ZeRO-1/2 reduce them: expert
parameters carry `allreduce = False` and `group_name = "ep_size_<ep>"`, their optimizer param groups
are marked `moe`, they are all-reduced over the expert-data-parallel group (the ranks holding the
same shard) and divided by the full data-parallel size. Through the all-to-all backward an expert
already receives the sum over the ep ranks' per-rank mean losses, so that division makes any ep
equal one process. DeepSpeed recognises MoE models by `isinstance(module, deepspeed.moe.layer.MoE)`;
the re-classed bank also derives from that class (without running its constructor) for that check.
"""
from __future__ import annotations

import fnmatch
import functools

import torch
import torch.distributed as dist
from torch import nn

from kernels.moe import gather, make_plan, scatter
from models.contract import ExpertBank, num_experts
from parallel.topology import ProcessGroups


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"


class _AllToAll(torch.autograd.Function):
    """Variable-split all-to-all of rows; the backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


def _expert_parallel_forward(bank: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor,
                             gates: torch.Tensor) -> torch.Tensor:
    group, ep, experts = bank.ep_group, bank.ep_size, bank.num_experts
    local = experts // ep
    k = expert_ids.shape[-1]
    # block 1: rows leave in exact expert order, those for each destination rank contiguous. The Triton
    # path tiles by >= 16 rows, so this unpadded gather (and the scatter home) take the torch path.
    plan = make_plan(expert_ids, experts, fan_in=k, fan_out=k, block=1)
    counts = plan.counts
    incoming_counts = torch.empty_like(counts)  # [source rank, my local expert]
    # The count exchange runs while the rows are gathered into send order (spec §4: overlap it).
    exchange = dist.all_to_all_single(incoming_counts, counts, group=group, async_op=True)
    outgoing = gather(x, plan, "torch")
    exchange.wait()
    send = counts.view(ep, local).sum(1).tolist()  # one host sync per call (spec §4 step 4)
    recv = incoming_counts.view(ep, local).sum(1).tolist()
    received = _AllToAll.apply(outgoing, recv, send, group)
    local_ids = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(incoming_counts)
    h = bank.expert_forward(received, local_ids)  # the bank's own local compute over its experts
    back = _AllToAll.apply(h, send, recv, group)  # home, in expert order
    return scatter(back, plan, gates, "torch")


@functools.cache
def _bank_class() -> type:
    from deepspeed.moe.layer import MoE

    class ExpertParallel(MoE):
        """Mixed into an expert bank's class by `apply_expert_parallel`: the bank holds experts
        [ep_rank·E/ep, (ep_rank+1)·E/ep) and exchanges rows with the other ranks of its ep group."""

        def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
            return _expert_parallel_forward(self, x, expert_ids, gates.to(x.dtype))

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            """The engine asks a MoE layer to create its groups; ours are registered already."""

    return ExpertParallel


@functools.cache
def _expert_parallel_class(cls: type) -> type:
    # the mixin first: its forward replaces the bank's; the bank's own methods (expert_forward) stay
    return type(f"ExpertParallel{cls.__name__}", (_bank_class(), cls), {})


# DeepSpeed's native MoE checkpoint layout names each expert's tensors `<layer>.deepspeed_moe.experts.
# deepspeed_experts.<id>.<name>` and writes one file per (layer, global expert): ep-independent.
DS_EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts."


def _state_dict_per_expert(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The bank's [E_local, ...] tensors as one entry per local expert, so DeepSpeed's MoE checkpoint
    writes them one file per global expert (and keeps them out of the replicated model states)."""
    for name in module.expert_parameters():
        stacked = state_dict.pop(prefix + name, None)
        if stacked is not None:
            for j, t in enumerate(stacked.unbind(0)):
                state_dict[f"{prefix}{DS_EXPERT_KEY}{j}.{name}"] = t


def _load_per_expert(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    """The inverse on load: DeepSpeed hands back per-local-expert entries; stack them again."""
    for name in module.expert_parameters():
        keys = [f"{prefix}{DS_EXPERT_KEY}{j}.{name}" for j in range(module.num_local_experts)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def _register_deepspeed_groups(groups: ProcessGroups) -> str:
    """Hand our ep / expert-data-parallel groups to DeepSpeed's registry under its naming convention."""
    from deepspeed.utils import groups as ds_groups

    topo = groups.topology
    name = group_name(topo.ep)
    ep_ranks, edp_ranks = topo.expert_groups()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups["ep"]
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(r for r in ep_ranks if groups.rank in r)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups["expert_dp"]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(r for r in edp_ranks if groups.rank in r)
    return name


def apply_expert_parallel(model: nn.Module, pattern: str, groups: ProcessGroups) -> int:
    """Shard every expert bank matching `pattern` over the ep group; returns how many were sharded."""
    ep = groups.topology.ep
    rank = dist.get_rank(groups["ep"])
    name = _register_deepspeed_groups(groups)
    n = 0
    for path, module in model.named_modules():
        if not fnmatch.fnmatchcase(path, pattern):
            continue
        if not isinstance(module, ExpertBank):
            raise ValueError(f"expert parallel: {path} is a {type(module).__name__}, which does not implement the "
                             "expert bank protocol (models.contract.ExpertBank)")
        total = num_experts(module)
        if total % ep:
            raise ValueError(f"{path}: {total} experts do not divide over parallel.ep={ep}")
        local = total // ep
        for pname in module.expert_parameters():
            full = getattr(module, pname)
            shard = nn.Parameter(full.detach()[rank * local:(rank + 1) * local].clone())
            shard.allreduce, shard.group_name = False, name  # DeepSpeed's MoE parameter convention
            shard.ep_shard_dim = 0
            setattr(module, pname, shard)
        module.__class__ = _expert_parallel_class(type(module))
        module.ep_group, module.ep_size, module.num_experts = groups["ep"], ep, total
        module.num_local_experts, module.expert_group_name = local, name
        module.register_state_dict_post_hook(_state_dict_per_expert)
        module.register_load_state_dict_pre_hook(_load_per_expert)
        n += 1
    return n


def expert_group_of(p: torch.Tensor):  # noqa: ANN201
    """The ep group an expert-sharded parameter is split over; None for any other parameter."""
    if getattr(p, "ep_shard_dim", None) is None:
        return None
    from deepspeed.utils import groups as ds_groups

    return ds_groups._get_expert_parallel_group(p.group_name)


def gather_experts(p: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """The full tensor of an expert-sharded parameter (others as they are); collective over the ep group."""
    if getattr(p, "ep_shard_dim", None) is None or group is None or dist.get_world_size(group) == 1:
        return p.detach().clone()
    parts = [torch.empty_like(p) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    return torch.cat(parts, dim=p.ep_shard_dim)
