"""Single-device math of the architectures, their configs and presets, behind one registry.

Architectures outside this package register through the same door: `LMFORGE_PLUGINS` names modules
(comma-separated, importable from the Python path) that call `models.register(...)` when imported.
"""
import importlib
import os

from models.contract import ContextParallelCore, ExpertBank, SequenceCore
from models.registry import ModelDims, ModelSpec, PipeBlock, build, get_spec, make_config, names, register
import models.transformer  # noqa: F401  (registers "transformer")
import models.deltanet  # noqa: F401  (registers "deltanet")
import models.moeut  # noqa: F401  (registers "moeut")
import models.rmt  # noqa: F401  (registers "rmt")
import models.memoryformer  # noqa: F401  (registers "memoryformer")

__all__ = ["ContextParallelCore", "ExpertBank", "ModelDims", "ModelSpec", "PipeBlock", "SequenceCore", "build",
           "get_spec", "make_config", "names", "register"]


def _import_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get("LMFORGE_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"LMFORGE_PLUGINS names {name!r}, which does not import: {e}") from e


_import_plugins()
