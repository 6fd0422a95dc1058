"""One registration per architecture: the only door `parallel/` and `launcher/` use.

A model class in the registry follows one protocol: `model_cls(cfg)` builds it,
`model.init_rules()` names each parameter's initial value (models/init.py) and
`model.init_weights(seed)` applies them (and recomputes derived buffers). `build()` relies on it to
construct on the meta device, materialise and initialise once; `parallel/` materialises only a
rank's shard from the same rules, so every rank and layout starts from identical weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from models.init import Fill, norm_rules, normal, prefixed


@dataclass
class PipeBlock:
    """One entry of a model's ordered block list, the unit of pipeline-stage partitioning.

    `module` holds the parameters; `forward(module, x)` runs the block (None: `module(x)`).
    Blocks with the same `tie` key share one `module` (e.g. embedding and tied output head) and
    live on every stage that uses them, their gradients summed across those stages. A block may
    return `(x, aux_loss)`: auxiliary losses travel with the activations to the loss.
    """

    module: nn.Module
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None
    tie: str | None = None
    layer: bool = False  # one application of a repeated layer (the planner counts activations per layer)


def lm_pipeline_blocks(model: nn.Module) -> list[PipeBlock]:
    """embedding, every layer, final norm, head, for a decoder LM with attributes `tok_embeddings`,
    `layers`, `norm`, `output` and `cfg.tie_embeddings` (a tied embedding and head share one block module)."""
    if model.cfg.tie_embeddings:
        shared = nn.ModuleDict({"tok_embeddings": model.tok_embeddings, "output": model.output})
        embed = PipeBlock(shared, lambda m, tokens: m["tok_embeddings"](tokens), tie="embeddings")
        head = PipeBlock(shared, lambda m, h: m["output"](h), tie="embeddings")
    else:
        embed, head = PipeBlock(model.tok_embeddings), PipeBlock(model.output)
    return [embed, *(PipeBlock(layer, layer=True) for layer in model.layers), PipeBlock(model.norm), head]


def lm_init_rules(model: nn.Module, layer_rules: Callable[[nn.Module], dict[str, Fill]], std: float) -> dict[str, Fill]:
    """Init rules of a decoder LM laid out as `lm_pipeline_blocks` expects: embedding and head N(0, std)
    (the head not at all when tied), each layer's own rules, the final norm's gain 1."""
    rules = {"tok_embeddings.weight": normal(std)}
    for i, layer in enumerate(model.layers):
        rules |= prefixed(f"layers.{i}", layer_rules(layer))
    rules |= prefixed("norm", norm_rules(model.norm))
    if not model.cfg.tie_embeddings:
        rules["output.weight"] = normal(std)
    return rules


@dataclass(frozen=True)
class ModelDims:
    """The sizes the planner's activation estimate reads (Korthikanti et al. 2022): residual width,
    attention heads (0 for a model without attention scores), vocabulary."""

    hidden: int
    heads: int
    vocab: int


def lm_dims(cfg: Any) -> ModelDims:
    """ModelDims of a config with `d_model`, `n_heads` and `vocab_size` fields."""
    return ModelDims(cfg.d_model, cfg.n_heads, cfg.vocab_size)


def lm_head_counts(cfg: Any) -> dict[str, int]:
    """Counts TP must split whole, for a config whose attention has `n_heads` (and `n_kv_heads`)."""
    kv = getattr(cfg, "n_kv_heads", None)
    return {"n_heads": cfg.n_heads, **({"n_kv_heads": kv} if kv is not None else {})}


@dataclass
class ModelSpec:
    """Everything `parallel/` and `launcher/` know about an architecture (models/README.md)."""

    name: str
    config_cls: type
    presets: dict[str, dict]  # preset name -> config field overrides
    model_cls: type[nn.Module]
    # submodule-name pattern -> TP style: a built-in name ("colwise", "rowwise", "vocab", "headwise", "partial",
    # "headwise_region", "expert_hidden") or a parallel.tp_styles.TPStyle object (sharding and plan in one)
    tp_plan: dict[str, Any] | None = None
    pipeline_blocks: Callable[[nn.Module], list[PipeBlock]] | None = None  # model -> its forward as an ordered block list
    # submodule-name pattern of the context-parallel cores (models.contract.ContextParallelCore)
    cp_core: str | None = None
    # submodule-name pattern of the expert banks (models.contract.ExpertBank), sharded for expert parallel
    expert_bank: str | None = None
    dims: Callable[[Any], ModelDims] = lm_dims  # cfg -> sizes for the planner's activation estimate
    tp_units: Callable[[Any], dict[str, int]] = lm_head_counts  # cfg -> counts TP must split whole (heads)
    # (cfg, {"tp", "pp", "dp", "cp", "ep": degree, "sp": 0|1}) -> (spec key, reason) for a layout this config cannot run
    layout_refusal: Callable[[Any, dict[str, int]], tuple[str, str] | None] | None = None
    num_params: Callable[[Any], int] | None = None  # cfg -> parameter count (tied weights once)
    flops_per_token: Callable[[Any, int], float] | None = None  # (cfg, seq_len) -> training FLOPs per token
    # (cfg, aux) -> loss term, for models whose training forward returns (logits, aux); None: aux.sum()
    aux_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    # cfg -> z-loss coefficient: the training loss adds coef · mean logsumexp(logits)² (PaLM), computed by
    # the loss function (over the vocabulary shards under TP), recorded with the aux terms; None or 0: none
    z_loss: Callable[[Any], float] | None = None
    # parameter-name pattern (fnmatch) of lookup tables with sparse gradients: their own optimizer group, with
    # optim.table_lr_multiplier and optim.table_weight_decay
    table_params: str | None = None
    # (model or any module containing its layers, sum over data-parallel ranks) -> metrics gathered by the
    # forward passes since the last call (e.g. expert load); collective through the sum, so every rank calls it
    step_metrics: Callable[[nn.Module, Callable[[torch.Tensor], torch.Tensor]], dict[str, float]] | None = None


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    old = _SPECS.get(spec.name)
    # Re-importing a module (reload, notebooks) re-registers the same class; anything else is a clash.
    if old is not None and _qualname(old.model_cls) != _qualname(spec.model_cls):
        raise ValueError(f"model arch {spec.name!r} is already registered by {_qualname(old.model_cls)}")
    _SPECS[spec.name] = spec
    return spec


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def names() -> list[str]:
    return sorted(_SPECS)


def get_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown model arch {name!r}; known: {', '.join(names()) or '(none)'}")
    return _SPECS[name]


def make_config(arch: str, preset: str, **overrides: Any) -> Any:
    """Preset values first, then `overrides`; the config validates itself in `__post_init__`."""
    spec = get_spec(arch)
    if preset not in spec.presets:
        raise ValueError(f"unknown preset {preset!r} for arch {arch!r}; known: {', '.join(spec.presets)}")
    fields = [f.name for f in dataclasses.fields(spec.config_cls) if f.init]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {spec.config_cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    return spec.config_cls(**{**spec.presets[preset], **overrides})


def build(cfg: Any, seed: int | None = None) -> nn.Module:
    """Build the model for `cfg` on the current default device, initialised from `seed` (None: a seed
    drawn from torch's RNG, so `torch.manual_seed(s); build(cfg)` picks the weights).

    The module is constructed on the meta device, materialised, and initialised once by
    `init_weights(seed)`: every parameter is a function of (seed, canonical name, full shape)
    (models/init.py), so a rank that materialises only its shard (`parallel/materialize.py`) holds
    exactly these weights. Under `torch.device("meta")` the meta model is returned as is, for
    shapes, parameter counts and sharding before materialising.
    """
    arch = getattr(cfg, "arch", None)
    spec = get_spec(arch) if isinstance(arch, str) else None
    if spec is None or not isinstance(cfg, spec.config_cls):
        raise ValueError(f"{type(cfg).__name__} is not the config of a registered arch; known: {', '.join(names())}")
    target = torch.get_default_device()
    with torch.device("meta"), _no_fills_on_meta():
        model = spec.model_cls(cfg)
    if target.type == "meta":
        return model
    model.to_empty(device=target)
    model.init_weights(seed)
    return model


@contextlib.contextmanager
def _no_fills_on_meta() -> Iterator[None]:
    """Module constructors fill their parameters (nn.Embedding: `init.normal_`); on meta tensors that is
    meaningless (`init_weights` or `materialize` fills them later) and costly: torch runs a meta `normal_`
    through a Python reference whose first call imports torch._dynamo, ~3 s of every `submit`'s validation
    and `launcher plan`. Real tensors (another thread's) still get the fill."""
    real = nn.init.normal_

    def normal_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if tensor.is_meta else real(tensor, *args, **kwargs)

    nn.init.normal_ = normal_
    try:
        yield
    finally:
        nn.init.normal_ = real
