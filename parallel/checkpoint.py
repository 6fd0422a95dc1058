"""Atomic checkpoints: DeepSpeed engine state + our client state, published with a manifest.

Layout under `root`: `step_<N>/` (complete, with `manifest.json`), `.tmp-step_<N>/` (being written),
`latest` (name of the newest complete one, updated after the rename). A directory without a
valid manifest is never loaded. The directories must be on storage every rank can see.
"""
from __future__ import annotations

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

from kernels.fileio import atomic_write, file_sha256
from parallel.checkpoint_manifest import (MANIFEST, complete_steps, latest_good, latest_published, read_manifest,
                                          step_of, verify)
from parallel.safe_load import safe_torch_load

log = logging.getLogger("lmforge." + __name__)

__all__ = ["MANIFEST", "CheckpointWriteError", "complete_steps", "latest_good", "latest_published", "load",
           "read_manifest", "save", "verify"]

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True: no NumPy objects)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank; nothing was published, older ones are intact."""


class _RecordingWrites:
    """Wraps DeepSpeed's file writes so an I/O error is recorded instead of raised.

    DeepSpeed's save_checkpoint has collectives around its writes (a barrier at the end): a rank
    that raised out of it would leave its peers waiting there. Every rank instead finishes the
    call, and the ranks then agree on whether all writes succeeded.
    """

    def __init__(self, engine):
        self.engine, self.errors = engine, []
        self._save, self._copy = engine.checkpoint_engine.save, engine._copy_recovery_script

    def _guard(self, fn, what):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as a RuntimeError
                self.errors.append(describe_write_error(what(*args), e))
        return call

    def __enter__(self) -> "_RecordingWrites":
        self.engine.checkpoint_engine.save = self._guard(self._save, lambda sd, path: path)
        self.engine._copy_recovery_script = self._guard(self._copy, lambda path: f"{path} (recovery script)")
        return self

    def __exit__(self, *exc) -> None:
        self.engine.checkpoint_engine.save, self.engine._copy_recovery_script = self._save, self._copy


def describe_write_error(path: str | Path, e: BaseException) -> str:
    """The error, and the disk's state when that explains it (torch.save's message does not)."""
    msg = f"{path}: {e}"
    try:
        free = shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free
    except OSError:
        return msg
    if free < 16 << 20 and "No space left" not in msg:
        msg += f" (No space left on device: {free} bytes free)"
    return msg


def _gather_errors(mine: list[str]) -> list[str]:
    if not dist.is_initialized():
        return mine
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return [f"rank {r}: {e}" for r, errs in enumerate(everyone) for e in errs]


def save(engine, root: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the published directory.

    Raises CheckpointWriteError on every rank if any rank failed to write (disk full, I/O error):
    the partial directory is removed and the previous checkpoints are untouched.
    """
    from parallel import consolidated

    root = Path(root)
    name = f"step_{step}"
    tmp_name = f".tmp-{name}"
    tmp = root / tmp_name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    tensors, trainer = consolidated.gather(engine)  # collectives first, so no write sits between them
    with _RecordingWrites(engine) as writes:
        engine.save_checkpoint(str(root), tag=tmp_name, client_state=client_state, save_latest=False)
    errors = writes.errors
    try:
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        consolidated.write(tmp / "consolidated", tensors, trainer)
    except (OSError, RuntimeError) as e:
        errors.append(describe_write_error(tmp, e))
    errors = _gather_errors(errors)
    final = root / name
    if not errors and _rank() == 0:
        try:
            _publish(tmp, final, root, {"step": step, **meta, **engine_layout(engine)})
        except OSError as e:
            errors.append("rank 0: publishing " + describe_write_error(final, e))
    errors = _broadcast_errors(errors)
    if errors:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        good = latest_published(root)
        raise CheckpointWriteError(
            f"checkpoint {final} was not written ({'; '.join(errors[:4])}); "
            f"the newest good checkpoint is still {good if good else 'none'}"
        )
    if _rank() == 0:
        _prune(root, keep)
    _barrier()
    return final


def _broadcast_errors(errors: list[str]) -> list[str]:
    if not dist.is_initialized():
        return errors
    box = [errors]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _publish(tmp: Path, final: Path, root: Path, manifest: dict[str, Any]) -> None:
    """Manifest last inside the directory, then the rename, then `latest`: a crash at any point
    leaves either the old set of checkpoints or the new one, never a half-written one that loads."""
    _fsync_tree(tmp)
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    atomic_write(tmp / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))
    trash = root / f".trash-{final.name}"
    if final.exists():  # the same step written again after a restart: the new one replaces it
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(root / "latest", final.name)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = sorted(complete_steps(root), key=step_of)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def engine_layout(engine) -> dict[str, int]:  # noqa: ANN001
    """The degrees a DeepSpeed checkpoint is tied to; the manifest records them."""
    from deepspeed.utils import groups as ds_groups

    mpu = getattr(engine, "mpu", None)
    tp = mpu.get_slice_parallel_world_size() if mpu is not None else 1
    ep = max((int(name.rsplit("_", 1)[1]) for name in ds_groups._get_expert_parallel_group_dict()), default=1) \
        if getattr(engine, "has_moe_layers", False) else 1
    return {"tp": tp, "pp": getattr(engine, "num_stages", 1), "dp": engine.dp_world_size, "ep": ep}


def _fmt(layout: dict[str, int]) -> str:
    shown = ("tp", "pp", "dp") + (("ep",) if layout.get("ep", 1) != 1 else ())  # ep only for expert-parallel runs
    return " ".join(f"{k}={layout[k]}" for k in shown)


def load(engine, path: Path) -> dict[str, Any]:
    """Collective: load engine, optimizer and scheduler state and this rank's RNG; returns the client state.

    Same layout (tp, pp, dp, ep) as when written: DeepSpeed's own checkpoint (bitwise exact). Any
    other layout (elastic resume, resharding): the consolidated export, re-sliced by this engine.
    """
    from parallel import consolidated

    path = Path(path)
    manifest = read_manifest(path)
    now = engine_layout(engine)
    written = {k: manifest.get(k, 1) for k in ("tp", "pp", "ep")} | {"dp": manifest.get("dp", now["dp"])}
    same = written == now
    if same:
        _, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client is None:
            raise RuntimeError(f"checkpoint {path} could not be loaded by DeepSpeed")
    else:
        log.info("checkpoint %s was written with %s; loading its consolidated state into %s", path, _fmt(written), _fmt(now))
        consolidated.load(engine, path / "consolidated")
        client = _client_state(path)
    rng = path / f"rng_rank{_rank()}.pt"
    if rng.is_file() and same:
        set_rng_state(safe_torch_load(rng))
    return client


def _client_state(path: Path) -> dict[str, Any]:
    """Our keys of DeepSpeed's model-states file (it stores client_state at its top level)."""
    states = min(path.rglob("mp_rank_*_model_states.pt"))
    sd = safe_torch_load(states, map_location="cpu")
    ours = ("step", "data", "mlflow_run_id", "spec_hash")
    return {k: sd[k] for k in ours if k in sd}
