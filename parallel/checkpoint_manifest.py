"""Which checkpoint directories are complete and intact: the manifest side of `parallel/checkpoint.py`.

Standard library only, so `launcher status` and the driver can answer without importing torch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kernels.fileio import file_sha256

log = logging.getLogger("lmforge." + __name__)

MANIFEST = "manifest.json"


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_steps(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, info in files.items():
        p = path / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != info["bytes"]:
            return f"size mismatch in {rel}"
        if file_sha256(p) != info["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def latest_good(root: Path) -> Path | None:
    """Newest checkpoint that verifies; broken ones are skipped with a warning naming them."""
    for path in sorted(complete_steps(root), key=step_of, reverse=True):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def latest_published(root: Path) -> Path | None:
    """The checkpoint `latest` names, if it has a manifest (cheap: no checksums; for status displays)."""
    try:
        path = Path(root) / (Path(root) / "latest").read_text().strip()
    except OSError:
        return None
    return path if (path / MANIFEST).is_file() else None


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())
