"""A DataLoader over a TokenStream whose worker round-robin preserves the stream's order."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stream import TokenStream


class StreamDataset(IterableDataset):
    """Worker w of W yields micro-batches w, w+W, ...; the DataLoader takes one from each
    worker in turn, so the merged order is exactly the stream's."""

    def __init__(self, stream: TokenStream, with_ids: bool = False):
        self.stream, self.with_ids = stream, with_ids

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A worker holds a copy of the stream made when iter(loader) started it: that is the start.
        return self.stream.micro_batches(self.stream.state_dict(), with_ids=self.with_ids,
                                         worker=worker, num_workers=workers)


def make_loader(stream: TokenStream, num_workers: int, *, with_ids: bool = False, pin_memory: bool = False,
                multiprocessing_context: Any = None) -> DataLoader:
    """Each iter() of the returned loader starts at the stream's position at that moment."""
    return DataLoader(StreamDataset(stream, with_ids), batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      multiprocessing_context=multiprocessing_context if num_workers > 0 else None)
