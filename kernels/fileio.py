"""Atomic file writes and file checksums: the one copy every package uses (checkpoints, job state, shards,
manifests, tokenizers).

Why here: parallel/ must not import data_pipeline/, and data_pipeline/ imports no other package of ours, so no
existing package serves both. kernels/ is the bottom of launcher -> parallel -> models -> kernels, and
data_pipeline/ allows itself this one module of it (ops_tests/data_pipeline/test_data_layering.py), because it
imports only the standard library and kernels/__init__ is empty: no torch, triton, model or rank comes with it.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: Path, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` whole or not at all: written under a temporary name in the same
    directory, flushed (and fsynced unless `fsync=False`), then `os.replace`d over `path`. If the block
    raises, the temporary file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer: several processes may write one file (the job registry). `open(..., "xb")` rather
    # than mkstemp, so the file gets the umask's permissions (mkstemp's 0600 would hide shards from a group).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A crash must not leave temp litter that a later glob, or a full disk, would have to deal with.
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Write `data` (str as UTF-8) to `path` atomically; see `atomic_open`."""
    with atomic_open(path, fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
