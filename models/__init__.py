"""Single-device math of the architectures, their configs and presets, behind one registry."""
from models.contract import ContextParallelCore, ExpertBank, SequenceCore
from models.registry import ModelDims, ModelSpec, PipeBlock, build, get_spec, make_config, names, register
import models.transformer  # noqa: F401  (registers "transformer")
import models.deltanet  # noqa: F401  (registers "deltanet")
import models.moeut  # noqa: F401  (registers "moeut")

__all__ = ["ContextParallelCore", "ExpertBank", "ModelDims", "ModelSpec", "PipeBlock", "SequenceCore", "build",
           "get_spec", "make_config", "names", "register"]
