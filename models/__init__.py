"""Single-device math of the architectures, their configs and presets, behind one registry."""
from models.registry import ModelSpec, PipeBlock, build, get_spec, make_config, names, register
import models.transformer  # noqa: F401  (registers "transformer")
import models.deltanet  # noqa: F401  (registers "deltanet")
import models.moeut  # noqa: F401  (registers "moeut")

__all__ = ["ModelSpec", "PipeBlock", "build", "get_spec", "make_config", "names", "register"]
