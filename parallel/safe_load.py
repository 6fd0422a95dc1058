"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle: unpickled as-is it can call any function it names. Everything we write is
tensors and plain values, so we read it with `torch.load(weights_only=True)`, whose unpickler builds
only tensors, containers and numbers. DeepSpeed's own engine files also hold four small DeepSpeed
values (its loss scaler, the ZeRO stage enum, a fragment address): those classes are allowed by name
and nothing else. DeepSpeed reads its files through its checkpoint engine; ours (`SafeCheckpointEngine`)
is the same engine with that loader.

Two layers: `refuse_unsafe` disassembles every pickle in a checkpoint directory without running it and
names the first file that needs anything more (the one-line refusal the CLI shows before any worker
starts); `safe_torch_load` is the loader itself, the guarantee (a payload the static scan cannot see
still fails there).
"""
from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeFileError", "allowed_globals", "refuse_unsafe", "safe_torch_load", "install", "unsafe_globals"]


class UnsafeFileError(ValueError):
    """A file that cannot be loaded without running code named in it; never retried."""

    def __init__(self, path: str | Path, needs: str):
        self.path = str(path)
        super().__init__(f"refusing to load {path}: unpickling it would call {needs}, which could run code; "
                         f"lmforge checkpoints hold only tensors and plain values (was it written by someone else?)")


# The names of `allowed_globals()`, for the static scan (which then needs no DeepSpeed import).
ALLOWED_NAMES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def allowed_globals() -> list[type]:
    """What DeepSpeed's engine and ZeRO files pickle beyond tensors and containers. Each is plain data:
    an object with attributes (loss scalers), an Enum (built from its value) or a dataclass."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a torch.save file names that `safe_torch_load` would refuse (static: nothing runs)."""
    if not zipfile.is_zipfile(path):
        # The legacy (non-zip) format cannot be disassembled by torch's helper; nothing of ours writes it.
        return ["(a pickle in torch's legacy file format)"]
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in ALLOWED_NAMES]


def refuse_unsafe(directory: str | Path) -> None:
    """Raise UnsafeFileError naming the first `.pt` file under `directory` that needs more than tensors."""
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            bad = unsafe_globals(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
            raise UnsafeFileError(path, f"an unreadable pickle ({type(e).__name__})") from None
        if bad:
            raise UnsafeFileError(path, ", ".join(bad[:3]))


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load that builds only tensors, plain containers and the allowed DeepSpeed values."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        needs = next((line.split("GLOBAL ", 1)[1].split(" ")[0] for line in str(e).splitlines() if "GLOBAL " in line),
                     "something beyond tensors and plain values")
        raise UnsafeFileError(path, needs) from None


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save checkpoint engine, loading with `safe_torch_load`."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location)

    return SafeCheckpointEngine


def install(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints with `safe_torch_load` (its writes are unchanged)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(f"DeepSpeed chose checkpoint engine {type(current).__name__}; lmforge loads only through "
                        "torch's (no checkpoint writer or datastates config)")
    safe = _safe_engine_class()(engine._config)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
