"""Which sample sits at each position of an epoch: pure index math, no I/O."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# Domain tags keep the two seed streams apart (SeedSequence([a, b]) equals SeedSequence([a, b, 0])).
_SHARD_ORDER, _WITHIN_BLOCK = 1, 2


class EpochOrder:
    """The epoch's sample sequence: shards in a seeded order, then samples permuted within
    blocks of `block` consecutive shards (block=1: within each shard only).

    A shard holds a contiguous stretch of the corpus, so permuting within one shard would
    feed many consecutive steps from the same few documents; a block of shards mixes them
    while a reader still needs only about `block` shards in memory. Positions are global
    (the whole job's view), so every dp size sees the same sequence.
    """

    def __init__(self, counts: list[int], seed: int, epoch: int, block: int = 1):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.block = seed, epoch, block
        self.shard_order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(self.counts))
        self.starts = np.concatenate([[0], np.cumsum(self.counts[self.shard_order])])  # per permuted slot
        n = len(self.counts)
        self.block_starts = self.starts[np.append(np.arange(0, n, block), n)]  # first slot of each block, + end
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])[:-1]  # manifest order, for global ids
        self._perm = lru_cache(maxsize=8)(self._block_perm)

    def _block_perm(self, b: int) -> np.ndarray:
        size = int(self.block_starts[b + 1] - self.block_starts[b])
        return np.random.default_rng([self.seed, self.epoch, _WITHIN_BLOCK, b]).permutation(size)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in manifest order, sample index in that shard) for each position."""
        positions = np.asarray(positions, dtype=np.int64)
        blk = np.searchsorted(self.block_starts, positions, side="right") - 1
        unshuffled = np.empty_like(positions)  # position before the within-block permutation
        for b in np.unique(blk):
            sel = blk == b
            unshuffled[sel] = self.block_starts[b] + self._perm(int(b))[positions[sel] - self.block_starts[b]]
        slot = np.searchsorted(self.starts, unshuffled, side="right") - 1
        return self.shard_order[slot], unshuffled - self.starts[slot]

    def global_ids(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids in manifest order (shard offset + index), stable across epochs and seeds."""
        shard, index = self.locate(positions)
        return self.offsets[shard] + index
