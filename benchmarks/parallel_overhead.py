"""What model parallelism costs on CPU: step time of tp2, tp2+sp, pp2 and dp2 (and tp2xpp2 with
--four) relative to one process training the same global batch, and the bytes each rank hands to
collectives and point-to-point sends per step.

Every layout is built by `parallel.parallelize` + `build_engine`, as a job's worker builds it, on
gloo ranks of one torch thread each; the baseline is one process with one thread, measured in the
same run. Bytes are counted by wrapping the torch.distributed calls (all-reduce, all-gather,
reduce-scatter, broadcast, send) a rank makes during a training step: the payload handed to them,
and the bytes a ring algorithm puts on the wire for it (`WIRE`), the fair comparison across
collectives of different kinds. The slowest rank's step time and the busiest rank's bytes are shown.

    python benchmarks/parallel_overhead.py [--preset tiny] [--steps 6] [--four]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # the project first: ops_tests/ has folders named like its packages
sys.path.append(str(ROOT / "ops_tests"))

LAYOUTS = {
    "dp2": dict(dp=2, zero=1),
    "tp2": dict(tp=2, zero=1),
    "tp2+sp": dict(tp=2, sp=True, zero=1),
    "pp2": dict(pp=2, zero=1),
}
FOUR = {"tp2xpp2": dict(tp=2, pp=2, zero=1)}


# Bytes one rank puts on the wire per call for a payload of `size` bytes over `n` ranks (ring algorithms):
# all-reduce 2(n-1)/n, all-gather (n-1) shards, reduce-scatter (n-1)/n of its input, broadcast/send once.
WIRE = {"all_reduce": lambda size, n: 2 * (n - 1) / n * size, "all_gather": lambda size, n: (n - 1) * size,
        "all_gather_into_tensor": lambda size, n: (n - 1) * size, "all_gather_single": lambda size, n: (n - 1) * size,
        "reduce_scatter_tensor": lambda size, n: (n - 1) / n * size, "broadcast": lambda size, n: size,
        "send": lambda size, n: size}


def _count_bytes() -> dict[str, float]:
    """Wrap torch.distributed's calls so every payload is added up; returns the live counter."""
    import torch.distributed as dist

    counter = {"payload": 0.0, "wire": 0.0}

    def wrap(name: str, fn):  # noqa: ANN001, ANN202
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            values = [*args, *kwargs.values()]  # DeepSpeed's comm layer passes everything by keyword
            tensors = [a for a in values if isinstance(a, torch.Tensor)]
            lists = [t for a in values if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            src = tensors[-1] if tensors else (lists[0] if lists else None)  # the input (output first where both)
            if src is not None:
                size = src.numel() * src.element_size()
                group = kwargs.get("group", next((a for a in args if isinstance(a, dist.ProcessGroup)), None))
                counter["payload"] += size
                counter["wire"] += WIRE[name](size, dist.get_world_size(group))
            return fn(*args, **kwargs)
        return counted

    for name in WIRE:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return counter


def _run(rank: int, world: int, layout: dict, preset: str, steps: int, seq: int, global_batch: int) -> dict:
    import models
    from parallel.engine import EngineConfig, build_engine
    from parallel.parallelize import parallelize
    from parallel.step import train_step
    from parallel.topology import Topology, build_groups

    tp, pp, dp = layout.get("tp", 1), layout.get("pp", 1), layout.get("dp", 1)
    topo = Topology(tp=tp, pp=pp, dp=dp)
    groups = build_groups(topo, rank)
    torch.manual_seed(0)
    cfg = models.make_config("transformer", preset, vocab_size=8192, max_seq_len=seq)
    module, loss_fn = parallelize(models.build(cfg), "transformer", groups, sequence_parallel=layout.get("sp", False))
    micro = global_batch // dp // 2  # two micro-batches per step on every layout (pp needs more than one)
    engine = build_engine(module, EngineConfig(micro_batch=micro, grad_accum=2, dp=dp, zero=layout.get("zero", 1),
                                               total_steps=steps + 2, sequence_parallel=layout.get("sp", False)), groups)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (global_batch, seq + 1), generator=g) for _ in range(steps + 2)]
    dp_rank = topo.coords(rank)["dp"]
    counter = _count_bytes()
    times, payload, wire = [], [], []
    for i, batch in enumerate(batches):
        before = dict(counter)
        t0 = time.perf_counter()
        train_step(engine, list(batch.chunk(dp)[dp_rank].chunk(2)), torch.device("cpu"), loss_fn)
        if i >= 2:  # the first steps pay for allocation and DeepSpeed's lazy set-up
            times.append(time.perf_counter() - t0)
            payload.append(counter["payload"] - before["payload"])
            wire.append(counter["wire"] - before["wire"])
    return {"step_s": statistics.median(times), "payload": statistics.median(payload), "wire": statistics.median(wire)}


def _single(preset: str, steps: int, seq: int, global_batch: int) -> dict:
    from spawn_ranks import spawn_ranks

    return spawn_ranks(_run, 1, {}, preset, steps, seq, global_batch)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--four", action="store_true", help="also tp2xpp2 (4 ranks: oversubscribes a 2-core machine)")
    args = ap.parse_args()
    from spawn_ranks import spawn_ranks

    import models

    cfg = models.make_config("transformer", args.preset, vocab_size=8192, max_seq_len=args.seq_len)
    print(f"transformer {args.preset} ({models.get_spec('transformer').num_params(cfg) / 1e6:.1f}M params), "
          f"global batch {args.global_batch} x seq {args.seq_len}, fp32, gloo, 1 torch thread per rank, "
          f"median of {args.steps} steps")
    base = _single(args.preset, args.steps, args.seq_len, args.global_batch)
    print(f"{'layout':<10} {'ranks':>5} {'step s':>8} {'ratio':>6} {'payload MB/rank/step':>21} {'wire MB/rank/step':>18}")
    print(f"{'1 process':<10} {1:>5} {base['step_s']:>8.3f} {1.0:>6.2f} {0.0:>21.2f} {0.0:>18.2f}")
    layouts = {**LAYOUTS, **(FOUR if args.four else {})}
    for name, layout in layouts.items():
        world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
        ranks = spawn_ranks(_run, world, layout, args.preset, args.steps, args.seq_len, args.global_batch)
        step = max(r["step_s"] for r in ranks)
        payload, wire = (max(r[k] for r in ranks) / 1e6 for k in ("payload", "wire"))
        print(f"{name:<10} {world:>5} {step:>8.3f} {step / base['step_s']:>6.2f} {payload:>21.2f} {wire:>18.2f}")


if __name__ == "__main__":
    main()
