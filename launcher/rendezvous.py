"""The worker group's torch.distributed rendezvous on the embedded cluster: a file, not a socket.

Ray Train sets up the process group through a TCPStore on rank 0, and a TCPStore server listens on every
interface whatever address it is given. On the embedded cluster every rank runs on this host, so the
rendezvous can be a FileStore in the job directory instead (one fresh file per attempt), and gloo is told to
use the loopback interface: nothing of the job listens beyond 127.0.0.1. A remote cluster keeps Ray Train's
TCP rendezvous (its operator decides what the nodes can reach).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

# gloo and NCCL's bootstrap bind to the interface they are given (default: the one the hostname resolves to).
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


@dataclass
class FileRendezvousConfig(TorchConfig):
    """TorchConfig whose rendezvous is a file under `rendezvous_dir` (all ranks must see that directory)."""

    rendezvous_dir: str = ""

    @property
    def backend_cls(self):  # noqa: ANN201 - Ray's Backend protocol
        return _FileRendezvousBackend


class _FileRendezvousBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: FileRendezvousConfig) -> None:  # noqa: ANN001
        import ray

        directory = Path(backend_config.rendezvous_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("store-*"):  # an earlier attempt's; every rank of this one is about to join anew
            stale.unlink(missing_ok=True)
        url = f"file://{directory / f'store-{uuid.uuid4().hex}'}"
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend or "gloo",
                                              world_rank=i, world_size=len(worker_group), init_method=url,
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])
