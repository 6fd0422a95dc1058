"""Validation batches: the first samples of the val split, split disjointly over dp ranks."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .manifest import load_manifest
from .shard_cache import ShardCache, check_shards_present


def val_batches(shards_dir: Path, *, micro_batch: int, dp_rank: int, dp_size: int,
                max_samples: int | None = None, with_ids: bool = False) -> Iterator[torch.Tensor]:
    """Micro-batches [micro_batch, seq_len+1] of the first `max_samples` val samples (manifest order).

    Each rank gets a contiguous block of equal size, a whole number of micro-batches, so all
    ranks run the same number of forward passes; the few samples that don't divide evenly are skipped.
    """
    shards_dir = Path(shards_dir)
    if micro_batch < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"bad val settings for {shards_dir}: micro_batch={micro_batch} dp_rank={dp_rank} "
                        f"dp_size={dp_size}")
    m = load_manifest(shards_dir)
    check_shards_present(shards_dir, m.val)
    n = m.val.samples if max_samples is None else min(max_samples, m.val.samples)
    per_rank = n // (dp_size * micro_batch) * micro_batch
    if per_rank == 0:
        raise DataError(f"{shards_dir} has {n} usable val samples, fewer than dp_size*micro_batch "
                        f"= {dp_size}*{micro_batch}")
    # Checks above run now, at the call; reading starts at the first next().
    return _batches(ShardCache(shards_dir, m, m.val), dp_rank * per_rank, per_rank, micro_batch, with_ids)


def _batches(cache: ShardCache, begin: int, count: int, micro_batch: int, with_ids: bool) -> Iterator[torch.Tensor]:
    counts = np.array([s.samples for s in cache.split.shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for first in range(begin, begin + count, micro_batch):
        ids = np.arange(first, first + micro_batch)
        shard = np.searchsorted(starts, ids, side="right") - 1
        tokens = torch.from_numpy(cache.rows(shard, ids - starts[shard]))
        yield (tokens, torch.from_numpy(ids)) if with_ids else tokens
