"""Load train/val shards on demand, verified against the manifest, keeping the last few."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from kernels.fileio import file_sha256

from .errors import DataError
from .manifest import PREPARE_HINT, Manifest, SplitInfo
from .shards import read_shard


def check_shards_present(shards_dir: Path, split: SplitInfo) -> None:
    """Fail before training starts, not mid-run, when a shard file is missing."""
    for s in split.shards:
        if not (Path(shards_dir) / s.name).is_file():
            raise DataError(f"missing shard {Path(shards_dir) / s.name}: {PREPARE_HINT} again")


def verify_shards(shards_dir: Path, manifest: Manifest, max_bytes: int) -> bool:
    """Check every shard's sha256 against the manifest now, if the whole set is at most `max_bytes`
    (False: too big, left to the readers, which check each shard they open). A damaged shard raises
    DataError naming it: it cannot heal, so the job should end before a worker starts."""
    infos = [s for split in (manifest.train, manifest.val) for s in split.shards]
    shards = [Path(shards_dir) / s.name for s in infos]
    for path in shards:
        if not path.is_file():
            raise DataError(f"missing shard {path}: {PREPARE_HINT} again")
    if sum(p.stat().st_size for p in shards) > max_bytes:
        return False
    for path, info in zip(shards, infos):
        got = file_sha256(path)
        if got != info.sha256:
            raise DataError(f"corrupt shard {path}: sha256 {got[:12]}… differs from {info.sha256[:12]}… in "
                            f"{Path(shards_dir) / 'manifest.json'} ({path.stat().st_size} bytes now)")
    return True


class ShardCache:
    """A reader's small LRU of decoded shards (reads move forward through the epoch, so few suffice)."""

    def __init__(self, shards_dir: Path, manifest: Manifest, split: SplitInfo, *, verify: bool = True,
                 capacity: int = 2):
        self.dir, self.manifest, self.split = Path(shards_dir), manifest, split
        self.verify, self.capacity = verify, capacity
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def shard(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        info = self.split.shards[i]
        path = self.dir / info.name
        if not path.is_file():
            raise DataError(f"missing shard {path}: {PREPARE_HINT} again")
        if self.verify and file_sha256(path) != info.sha256:
            raise DataError(f"corrupt shard {path}: sha256 differs from {self.dir / 'manifest.json'}")
        rows = read_shard(path, self.manifest.seq_len, self.manifest.dtype, expected=info.samples)
        self._cache[i] = rows
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return rows

    def rows(self, shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Rows for (shard, index) pairs, in the given order."""
        out = np.empty((len(shards), self.manifest.seq_len + 1), dtype=np.int64)
        for s in dict.fromkeys(shards.tolist()):  # first-appearance order keeps the LRU useful
            sel = shards == s
            out[sel] = self.shard(s)[indices[sel]]
        return out
