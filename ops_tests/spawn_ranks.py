"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Every call gets fresh processes (no state leaks from one case to the next: DeepSpeed and torch keep
globals), forked from a forkserver that has imported torch, DeepSpeed and our packages once: a
rank starts in milliseconds instead of re-importing them (~5 s of CPU per rank on the CI machine,
which dominated small layout cases). The function and its arguments travel pickled together with
the caller's `sys.path` and environment, so test modules the forkserver never saw still import.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import traceback
from typing import Any, Callable

# Imported once by the forkserver; every rank process is forked from it with these already loaded.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "deepspeed.pipe", "safetensors.torch", "models",
           "parallel.parallelize", "parallel.engine", "parallel.step", "parallel.checkpoint",
           "parallel.consolidated", "compare", "spawn_ranks"]

_context = None


def _ctx():  # noqa: ANN202 - a multiprocessing context
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _entry(payload: bytes, rank: int, world: int, init_file: str, queue) -> None:  # noqa: ANN001
    # Results travel as files: tensors sent through a queue vanish with the process that made them.
    try:
        fn, args = _unpack(payload)
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


def _unpack(payload: bytes) -> tuple[Callable, tuple]:
    """sys.path and the environment first (they decide what the function's module imports), then the rest."""
    path, env, body = pickle.loads(payload)
    sys.path[:] = path
    os.environ.clear()
    os.environ.update(env)
    return pickle.loads(body)


def spawn_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """`fn(rank, world, *args)` on each rank (a module-level function); results ordered by rank."""
    ctx = _ctx()
    queue = ctx.Queue()
    payload = pickle.dumps((list(sys.path), dict(os.environ), pickle.dumps((fn, args))))
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(payload, r, world, init_file, queue)) for r in range(world)]
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
