"""The architecture contract on gloo ranks, for every registered architecture without a per-arch line:
a rank that builds on the meta device and materialises only its part (tp2: its TP shard; pp2: its
stage) holds exactly the slice of a one-process build, and `launcher plan`'s per-rank counts
(`parallel/plan.py`, from the meta model and the declared TP styles) equal those sharded modules."""
from __future__ import annotations

import torch

import models
import toy_arch  # noqa: F401  (the test-only arch is checked like the built ones)
from parallel.plan import Layout, Workload, make_plan, meta_model, tp_shard_sizes
from spawn_ranks import spawn_ranks

VOCAB, SEQ, SEED = 64, 16, 0


def _cfg(arch: str):  # noqa: ANN202
    return models.make_config(arch, "tiny", vocab_size=VOCAB, max_seq_len=SEQ)


def _layouts(arch: str) -> list[str]:
    spec = models.get_spec(arch)
    return [name for name, declared in (("tp2", spec.tp_plan), ("pp2", spec.pipeline_blocks)) if declared]


def _held(rank: int, world: int) -> dict:
    from parallel.parallelize import parallelize
    from parallel.pipeline import canonical_parameters
    from parallel.topology import Topology, build_groups

    out = {}
    for arch in models.names():
        for layout in _layouts(arch):
            topo = Topology(tp=2) if layout == "tp2" else Topology(pp=2)
            groups = build_groups(topo, rank)
            with torch.device("meta"):
                model = models.build(_cfg(arch))
            module, _ = parallelize(model, arch, groups, seed=SEED)
            out[arch, layout] = {n: (p.detach().clone(), getattr(p, "tp_shard_dim", None))
                                 for n, p in canonical_parameters(module)}
    return out


def test_sharded_builds_hold_the_one_process_weights_and_the_planned_counts():
    ranks = spawn_ranks(_held, 2)
    checked = set()
    for arch in models.names():
        spec, cfg = models.get_spec(arch), _cfg(arch)
        full = dict(models.build(cfg, seed=SEED).named_parameters())
        work = Workload(seq_len=SEQ, micro_batch=1)
        for layout in _layouts(arch):
            plan = make_plan(cfg, Layout(**{layout[:2]: 2}), work)
            seen: set[str] = set()
            for rank, held in enumerate(r[arch, layout] for r in ranks):
                for name, (t, dim) in held.items():
                    want = full[name] if dim is None else full[name].chunk(2, dim=dim)[rank]
                    assert torch.equal(t, want), (arch, layout, rank, name)
                seen |= set(held)
                stage = 0 if layout == "tp2" else rank
                assert plan.stages[stage].params == sum(t.numel() for t, _ in held.values()), (arch, layout, rank)
                if layout == "tp2":
                    meta = meta_model(cfg)
                    sizes = tp_shard_sizes(meta, spec.tp_plan, 2)
                    assert {n: sizes[id(p)] for n, p in meta.named_parameters()} == \
                        {n: t.numel() for n, (t, _) in held.items()}, (arch, layout)
            assert seen == set(full), (arch, layout, sorted(set(full) - seen))  # every parameter is held somewhere
            checked.add((arch, layout))
    assert {("transformer", "tp2"), ("deltanet", "pp2"), ("moeut", "tp2"), ("memoryformer", "tp2"), ("toy", "tp2"),
            ("toy", "pp2")} <= checked
