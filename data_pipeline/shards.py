"""webdataset tar shards of fixed-length token samples: write and read back."""
from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from kernels.fileio import atomic_open, file_sha256

from .errors import DataError
from .manifest import ShardInfo

log = logging.getLogger("lmforge." + __name__)

FIELD = "tokens.bin"  # raw little-endian token ids, seq_len + 1 of them


def token_dtype(vocab_size: int) -> str:
    # Ids run 0..vocab_size-1, so uint16 holds any vocab up to 2**16 and halves the shard size.
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _le(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def write_shard(path: Path, samples: np.ndarray) -> ShardInfo:
    """Write `samples` [n, seq_len+1] as one tar shard (atomically) and describe it."""
    path = Path(path)
    rows = samples.astype(samples.dtype.newbyteorder("<"), copy=False)
    # Fixed mtime/owner make the shard a pure function of its tokens (stable sha256).
    with atomic_open(path) as f:
        with TarWriter(f, encoder=False, mtime=0, user="lmforge", group="lmforge") as w:
            for i, row in enumerate(rows):
                w.write({"__key__": f"{i:08d}", FIELD: row.tobytes()})
    return ShardInfo(name=path.name, samples=len(samples), sha256=file_sha256(path))


def write_shards(samples: np.ndarray, out_dir: Path, split: str, samples_per_shard: int) -> list[ShardInfo]:
    """Cut `samples` into shards `{split}-{i:05d}.tar` of at most `samples_per_shard` rows each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, start in enumerate(range(0, len(samples), samples_per_shard)):
        infos.append(write_shard(out_dir / shard_name(split, i), samples[start : start + samples_per_shard]))
    return infos


def _check_end_marker(path: Path) -> None:
    # tarfile treats a header cut at a block boundary as a clean end of archive, so a
    # truncated shard would read as a shorter one; a complete tar ends in two zero blocks.
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        raise DataError(f"truncated shard {path}: no end-of-archive marker ({size} bytes)")


def read_shard(path: Path, seq_len: int, dtype: str, expected: int | None = None) -> np.ndarray:
    """Read a shard back as [n, seq_len+1]; any damage raises DataError naming the shard."""
    path = Path(path)
    dt = _le(dtype)
    nbytes = (seq_len + 1) * dt.itemsize
    rows = []
    try:
        _check_end_marker(path)
        with open(path, "rb") as f:
            files = ({**s, "__url__": str(path)} for s in tar_file_iterator(f))
            for i, sample in enumerate(group_by_keys(files)):
                data = sample.get(FIELD)
                if sample["__key__"] != f"{i:08d}" or data is None or len(data) != nbytes:
                    got = "missing" if data is None else f"{len(data)} bytes"
                    raise DataError(f"corrupt shard {path}: sample {sample['__key__']!r} at {i} has {FIELD} "
                                    f"{got}, expected key {i:08d} with {nbytes} bytes")
                rows.append(np.frombuffer(data, dtype=dt))
    except DataError:
        raise
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        raise DataError(f"corrupt or unreadable shard {path}: {e}") from e
    if expected is not None and len(rows) != expected:
        raise DataError(f"corrupt shard {path}: {len(rows)} samples, manifest says {expected}")
    if not rows:
        return np.zeros((0, seq_len + 1), dtype=dt.newbyteorder("="))
    return np.stack(rows).astype(dt.newbyteorder("="), copy=False)
