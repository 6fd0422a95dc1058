"""Run a function on N gloo ranks in fresh processes and collect what each returns."""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable


def _entry(fn: Callable, rank: int, world: int, init_file: str, queue, args: tuple) -> None:
    # Results travel as files: tensors sent through a queue vanish with the process that made them.
    try:
        import torch

        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        from parallel.distributed import init_process_group, teardown

        init_process_group(rank, world, f"file://{init_file}", "gloo", timeout_s=300)
        try:
            out = fn(rank, world, *args)
        finally:
            teardown()
        torch.save(out, f"{init_file}.rank{rank}")
        queue.put((rank, "ok", None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))


def spawn_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """`fn(rank, world, *args)` on each rank (a module-level function); results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, queue, args)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world):
                rank, status, out = queue.get(timeout=timeout_s)
                if status != "ok":
                    raise RuntimeError(f"rank {rank} failed:\n{out}")
                results[rank] = __import__("torch").load(f"{init_file}.rank{rank}", weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]
