"""The `mpu` object DeepSpeed asks for its groups (Megatron's interface), backed by our topology.

Without pipeline parallelism DeepSpeed takes `mpu`: the model-parallel group is the TP group and
gradients are reduced over the data-parallel group, which is dp×cp (context-parallel ranks hold
the same weights). With pp>1 DeepSpeed takes its groups from the PipelineModule instead.
"""
from __future__ import annotations

import torch.distributed as dist

from parallel.topology import ProcessGroups


def _axis(group: str):
    """(group, rank, world size) getters of one of our groups, in DeepSpeed's method shape."""
    return (lambda self: self.groups[group],
            lambda self: dist.get_rank(self.groups[group]),
            lambda self: dist.get_world_size(self.groups[group]))


class MPU:
    def __init__(self, groups: ProcessGroups):
        self.groups = groups
        self.topology = groups.topology

    # tensor / model parallel
    get_model_parallel_group, get_model_parallel_rank, get_model_parallel_world_size = _axis("tp")
    get_tensor_model_parallel_group = get_slice_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_slice_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.get_model_parallel_rank()

    # data parallel (over dp×cp: what gradients are reduced over)
    get_data_parallel_group, get_data_parallel_rank, get_data_parallel_world_size = _axis("dp_cp")
    get_sequence_data_parallel_group = get_data_parallel_group
    get_sequence_data_parallel_rank = get_data_parallel_rank
    get_sequence_data_parallel_world_size = get_data_parallel_world_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        rank = dist.get_rank()
        return next(g for g in self.topology.groups("dp", "cp") if rank in g)

    # pipeline (trivial here: DeepSpeed's PipelineModule brings its own)
    get_pipe_parallel_group, get_pipe_parallel_rank, get_pipe_parallel_world_size = _axis("pp")
    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    # DeepSpeed's own sequence parallel (Ulysses) is not used: size 1
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0
