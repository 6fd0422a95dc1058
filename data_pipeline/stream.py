"""TokenStream: a resumable, rank-aware, deterministic stream over the train split.

The position is global (seed, epoch, samples consumed in the epoch) with the global batch
held fixed, as in MosaicML streaming: each dp rank derives its slice from it, so a resume
on another dp size continues with exactly the samples the old run would have seen next.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .manifest import load_manifest
from .order import EpochOrder
from .shard_cache import ShardCache, check_shards_present

log = logging.getLogger("lmforge." + __name__)


class TokenStream:
    """Micro-batches of train samples ([micro_batch, seq_len+1] int64) for one dp rank.

    The trainer, not the iterator, moves the position (`advance_step` after each optimizer
    step), because DataLoader workers read ahead of what has been trained on.
    """

    def __init__(self, shards_dir: Path, *, seed: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, num_workers: int = 0, shuffle_block: int = 8, verify: bool = True):
        self.shards_dir = Path(shards_dir)
        self.manifest = load_manifest(self.shards_dir)
        check_shards_present(self.shards_dir, self.manifest.train)
        if seed < 0 or micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or shuffle_block < 1:
            raise DataError(f"bad stream settings for {self.shards_dir}: seed={seed} micro_batch={micro_batch} "
                            f"dp_rank={dp_rank} dp_size={dp_size} shuffle_block={shuffle_block}")
        if global_batch < 1 or global_batch % (dp_size * micro_batch):
            raise DataError(f"global_batch {global_batch} is not a multiple of dp_size*micro_batch "
                            f"= {dp_size}*{micro_batch} (shards {self.shards_dir})")
        self.seed, self.global_batch, self.micro_batch = seed, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_workers, self.verify = dp_rank, dp_size, num_workers, verify
        self.shuffle_block = shuffle_block  # shards whose samples are mixed together; see EpochOrder
        self.counts = [s.samples for s in self.manifest.train.shards]
        self.total_samples = sum(self.counts)
        # Names the exact train shards: a position is meaningless on other data.
        shas = " ".join(s.sha256 for s in self.manifest.train.shards)
        self.shards_sha = hashlib.sha256(shas.encode()).hexdigest()[:16]
        # The tail that does not fill a global batch is dropped so every step is full.
        self.epoch_samples = self.total_samples // global_batch * global_batch
        if self.epoch_samples == 0:
            raise DataError(f"{self.shards_dir} has {self.total_samples} train samples, fewer than one global "
                            f"batch of {global_batch}")
        self.epoch, self.position = 0, 0

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_samples // self.global_batch

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.dp_size // self.micro_batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "global_batch": self.global_batch, "total_samples": self.total_samples,
                "shuffle_block": self.shuffle_block, "shards_sha": self.shards_sha}

    def _check_state(self, d: dict[str, Any]) -> None:
        # A different global batch, shuffle block or shard set would give the position another meaning.
        fixed = ("global_batch", "total_samples", "shuffle_block", "shards_sha")
        mine = {k: v for k, v in self.state_dict().items() if k in fixed}
        if any(d.get(k) != v for k, v in mine.items()):
            raise DataError(f"data position {d} does not match {self.shards_dir} with {mine}")
        if d["epoch"] < 0 or d["position"] % self.global_batch or not 0 <= d["position"] < self.epoch_samples:
            raise DataError(f"data position {d} is not a step boundary of {self.shards_dir}")

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._check_state(d)
        if d["seed"] != self.seed:
            log.warning("data stream resumes with the checkpoint's seed %s, not %s", d["seed"], self.seed)
        self.seed, self.epoch, self.position = int(d["seed"]), int(d["epoch"]), int(d["position"])

    def advance_step(self, steps: int = 1) -> None:
        """Mark `steps` global batches as consumed, rolling over into the next epoch."""
        pos = self.position + steps * self.global_batch
        self.epoch += pos // self.epoch_samples
        self.position = pos % self.epoch_samples

    def _steps(self, start_state: dict[str, Any] | None) -> Iterator[tuple[EpochOrder, int]]:
        """(epoch order, first position of the step) for every step from the start state on, forever."""
        state = self.state_dict() if start_state is None else start_state
        self._check_state(state)
        epoch, position = int(state["epoch"]), int(state["position"])
        while True:
            order = EpochOrder(self.counts, int(state["seed"]), epoch, self.shuffle_block)
            for start in range(position, self.epoch_samples, self.global_batch):
                yield order, start
            epoch, position = epoch + 1, 0

    def samples_for_steps(self, steps: int, start_state: dict[str, Any] | None = None) -> np.ndarray:
        """Global sample ids [steps, global_batch] the whole job consumes, in order (no I/O)."""
        out = np.empty((steps, self.global_batch), dtype=np.int64)
        for k, (order, start) in zip(range(steps), self._steps(start_state)):
            out[k] = order.global_ids(np.arange(start, start + self.global_batch))
        return out

    def micro_batches(self, start_state: dict[str, Any] | None = None, *, with_ids: bool = False,
                      worker: int = 0, num_workers: int = 1) -> Iterator[Any]:
        """This rank's micro-batches from the start state (default: current position), forever.

        With several workers, worker w yields micro-batches w, w+W, ... (counted from the
        start) and skips the others without reading their shards.
        """
        # One block's shards plus one: a micro-batch may straddle two blocks.
        cache = ShardCache(self.shards_dir, self.manifest, self.manifest.train, verify=self.verify,
                           capacity=self.shuffle_block + 1)
        per_rank = self.global_batch // self.dp_size
        m = 0
        for order, start in self._steps(start_state):
            for j in range(self.micro_batches_per_step):
                if m % num_workers == worker:
                    first = start + self.dp_rank * per_rank + j * self.micro_batch
                    shard, index = order.locate(np.arange(first, first + self.micro_batch))
                    tokens = torch.from_numpy(cache.rows(shard, index))
                    if with_ids:
                        ids = torch.from_numpy(order.offsets[shard] + index)
                        yield tokens, ids
                    else:
                        yield tokens
                m += 1

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers > 0:
            from .loader import make_loader  # loader wraps this class, so import late

            return iter(make_loader(self, self.num_workers))
        return self.micro_batches()
