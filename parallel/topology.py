"""The rank grid `world = pp × dp × cp × tp` (tp fastest, then cp, dp, pp) and its process groups.

Like torchtitan's ParallelDims: one object owns the degrees, checks them, and knows which ranks
share each group. `ep` divides `dp × cp`: experts are sharded over `ep` consecutive ranks of the
dp×cp plane, and their gradients are reduced over the expert-data-parallel group (the ranks of
that plane holding the same expert shard). Pure arithmetic; `build_groups` makes the torch groups.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

AXES = ("pp", "dp", "cp", "tp")  # slowest to fastest


@dataclass(frozen=True)
class Topology:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in (*AXES, "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {v!r}")
        if (self.dp * self.cp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide dp×cp = {self.dp}×{self.cp} = {self.dp * self.cp}")

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world {self.world}")
        out = {}
        for axis in reversed(AXES):
            size = getattr(self, axis)
            out[axis] = rank % size
            rank //= size
        return {a: out[a] for a in AXES}

    def rank_of(self, **coords: int) -> int:
        rank = 0
        for axis in AXES:
            rank = rank * getattr(self, axis) + coords.get(axis, 0)
        return rank

    def groups(self, *axes: str) -> list[list[int]]:
        """Every group of ranks that differ only along `axes` (e.g. ("dp", "cp") for gradient reduction)."""
        fixed = [a for a in AXES if a not in axes]
        out = []
        for fixed_vals in itertools.product(*(range(getattr(self, a)) for a in fixed)):
            base = dict(zip(fixed, fixed_vals))
            members = [self.rank_of(**base, **dict(zip(axes, vals)))
                       for vals in itertools.product(*(range(getattr(self, a)) for a in axes))]
            out.append(sorted(members))
        return out

    def to_deepspeed(self):  # noqa: ANN201 - deepspeed's PipeModelDataParallelTopology
        """DeepSpeed's grid with our rank order (pp slowest, tp fastest; cp ranks count as data parallel),
        for its PipelineModule, which takes its groups from a topology instead of an mpu."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp * self.cp)

    def expert_groups(self) -> tuple[list[list[int]], list[list[int]]]:
        """(ep groups, expert-data-parallel groups): the dp×cp plane cut into runs of `ep` ranks,
        and the ranks across those runs holding the same expert shard."""
        ep_groups, edp_groups = [], []
        for plane in self.groups("dp", "cp"):
            runs = [plane[i:i + self.ep] for i in range(0, len(plane), self.ep)]
            ep_groups.extend(runs)
            edp_groups.extend([run[j] for run in runs] for j in range(self.ep))
        return ep_groups, edp_groups


@dataclass
class ProcessGroups:
    """This rank's torch process groups, one per axis combination the parallel layers need."""

    topology: Topology
    rank: int
    by_name: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.by_name[name]


GROUP_AXES = {"tp": ("tp",), "pp": ("pp",), "dp": ("dp",), "cp": ("cp",), "dp_cp": ("dp", "cp")}


def build_groups(topology: Topology, rank: int) -> ProcessGroups:
    """Collective: every rank creates every group, in the same order (torch requires it)."""
    import torch.distributed as dist

    pg = ProcessGroups(topology, rank)
    named = {name: topology.groups(*axes) for name, axes in GROUP_AXES.items()}
    named["ep"], named["expert_dp"] = topology.expert_groups()
    for name, groups in named.items():
        for members in groups:
            g = dist.new_group(members)
            if rank in members:
                pg.by_name[name] = g
    return pg
