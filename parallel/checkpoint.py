"""Atomic checkpoints: DeepSpeed engine state + our client state, published with a manifest.

Layout under `root`: `step_<N>/` (complete, with `manifest.json`), `.tmp-step_<N>/` (being written),
`latest` (name of the newest complete one, updated after the rename). A directory without a
valid manifest is never loaded. The directories must be on storage every rank can see.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the published directory."""
    root = Path(root)
    name = f"step_{step}"
    tmp_name = f".tmp-{name}"
    tmp = root / tmp_name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    final = root / name
    if _rank() == 0:
        _fsync_tree(tmp)
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": files, **meta}, indent=1))
        if final.exists():  # a re-run of the same step after a restart: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", name)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(complete_steps(root), key=lambda p: _step_of(p))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
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
        if _sha256(p) != info["sha256"]:
            return f"checksum mismatch in {rel}"
    return None


def latest_good(root: Path) -> Path | None:
    """Newest checkpoint that verifies; broken ones are skipped with a warning naming them."""
    for path in sorted(complete_steps(root), key=_step_of, reverse=True):
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


def load(engine, path: Path) -> dict[str, Any]:
    """Collective: load engine + optimizer + scheduler state and this rank's RNG; returns the client state."""
    path = Path(path)
    _, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded by DeepSpeed")
    rng = path / f"rng_rank{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return client
