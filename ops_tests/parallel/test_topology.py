"""The rank grid: every axis's groups partition the world, coordinates round-trip, bad degrees are refused."""
from __future__ import annotations

import itertools

import pytest

from parallel.topology import AXES, Topology

LAYOUTS = [dict(tp=2), dict(pp=2, dp=2), dict(tp=2, pp=2, dp=2), dict(tp=2, dp=4, ep=2), dict(dp=2, cp=2, ep=4),
           dict(tp=4, pp=2, dp=2, cp=2, ep=2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_groups_partition_the_world_along_each_axis(layout):
    t = Topology(**layout)
    assert t.world == t.tp * t.pp * t.dp * t.cp
    for r in range(t.world):
        assert t.rank_of(**t.coords(r)) == r
    for n in range(1, len(AXES) + 1):
        for axes in itertools.combinations(AXES, n):
            groups = t.groups(*axes)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(t.world)), axes
            size = 1
            for a in axes:
                size *= getattr(t, a)
            assert all(len(g) == size for g in groups)
            for g in groups:  # members differ only along `axes`
                fixed = [{a: v for a, v in t.coords(r).items() if a not in axes} for r in g]
                assert all(f == fixed[0] for f in fixed)
    tp_groups = t.groups("tp")
    assert all(g == list(range(g[0], g[0] + t.tp)) for g in tp_groups), "tp must be the fastest axis (neighbouring ranks)"


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l.get("ep", 1) > 1], ids=str)
def test_expert_groups(layout):
    t = Topology(**layout)
    ep, edp = t.expert_groups()
    assert sorted(r for g in ep for r in g) == list(range(t.world))
    assert sorted(r for g in edp for r in g) == list(range(t.world))
    assert all(len(g) == t.ep for g in ep) and all(len(g) == t.dp * t.cp // t.ep for g in edp)
    plane_of = {r: i for i, g in enumerate(t.groups("dp", "cp")) for r in g}
    for g in ep + edp:  # expert groups stay inside one dp×cp plane (same tp and pp coordinates)
        assert len({plane_of[r] for r in g}) == 1


def test_bad_degrees_are_refused_with_the_arithmetic():
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide dp×cp = 2×2 = 4"):
        Topology(dp=2, cp=2, ep=3)
    with pytest.raises(ValueError, match=r"parallel.tp must be a positive integer, got 0"):
        Topology(tp=0)
