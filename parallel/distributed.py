"""Process-group setup and teardown shared by Ray workers, tests and benchmarks."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when asked for or available (auto), else cpu; the local rank picks the GPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(rank: int, world: int, init_method: str, backend: str = "gloo", timeout_s: float = 600) -> None:
    """For processes we spawn ourselves (tests, benchmarks); Ray Train sets up its own group."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def limit_threads(n: int) -> None:
    """Several ranks share few cores: one rank must not spin up a thread per core."""
    torch.set_num_threads(max(1, n))
    os.environ["OMP_NUM_THREADS"] = str(max(1, n))


def teardown() -> None:
    """Every rank ends with a barrier and an explicit destroy (DeepSpeed's pipeline engine can abort otherwise)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU (~40 s, needs g++) when it first sets up its
    comm layer; gloo alone gives the same results. Call before `deepspeed.init_distributed`/`initialize`."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
