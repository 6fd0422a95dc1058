"""The one atomic writer and the one file sha256 (kernels/fileio.py): whole-or-nothing writes that leave no
temporary files, permissions from the umask, multi-block hashes, and every package using this copy."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest

from kernels import fileio


def test_atomic_write_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"  # a missing parent is created
    fileio.atomic_write(path, "first")
    fileio.atomic_write(path, "zweite Fassung ✓")
    assert path.read_bytes() == "zweite Fassung ✓".encode("utf-8")
    fileio.atomic_write(path, b"\x00\xffraw", fsync=False)
    assert path.read_bytes() == b"\x00\xffraw"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    fileio.atomic_write(path, "step_1")
    with pytest.raises(RuntimeError, match="disk went away"):
        with fileio.atomic_open(path) as f:
            f.write(b"step_2, half")
            raise RuntimeError("disk went away")
    assert path.read_text() == "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_files_get_the_umask_permissions(tmp_path: Path) -> None:
    # Shards and manifests on shared storage must stay readable to the group, as a plain open() would make them
    # (mkstemp would make them 0600).
    old = os.umask(0o022)
    try:
        fileio.atomic_write(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_file_sha256_reads_every_block(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)  # three 1 MiB reads, the last one short
    (tmp_path / "blob").write_bytes(data)
    assert fileio.file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_every_package_uses_this_copy(tmp_path: Path) -> None:
    import data_pipeline
    from launcher import jobs
    from parallel import checkpoint

    # importlib: `data_pipeline.prepare` is also the name of a function the package exports.
    manifest, prepare, shards = (importlib.import_module(f"data_pipeline.{m}")
                                 for m in ("manifest", "prepare", "shards"))

    assert data_pipeline.file_sha256 is fileio.file_sha256
    assert checkpoint.file_sha256 is fileio.file_sha256 and prepare.file_sha256 is fileio.file_sha256
    assert checkpoint.atomic_write is fileio.atomic_write and jobs.atomic_write is fileio.atomic_write
    assert manifest.atomic_write is fileio.atomic_write and shards.atomic_open is fileio.atomic_open
    # The job-state flavour writes the same JSON text as before (indent 1, unknown types as str).
    jobs.write_json_atomic(tmp_path / "state.json", {"step": 3, "path": tmp_path})
    assert (tmp_path / "state.json").read_text() == json.dumps({"step": 3, "path": str(tmp_path)}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
