"""Layout-free initialisation: every parameter's initial value is a function of (seed, its canonical
name, its full shape) alone.

A model declares one fill per parameter (`init_rules()`: canonical name -> `Fill`); each fill draws from
its own generator, seeded from the run's seed and the parameter's name. So a rank can materialise only
its tensor-parallel shard and its pipeline stage — fill the one full parameter, keep its slice — and
hold exactly the weights one process would, in any order (`parallel/materialize.py`). Non-persistent
buffers (rotary tables) are derived data: modules that hold them recompute them in `init_buffers()`.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

Fill = Callable[[torch.Tensor, torch.Generator], None]  # fills a full-size tensor in place


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator private to one parameter: sha256 of (seed, name), so names never collide by offset."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def seed_from_rng() -> int:
    """A seed drawn from torch's global RNG: `torch.manual_seed(s); build(cfg)` stays the way to pick weights."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu").item())


def normal(std: float) -> Fill:
    def fill(t: torch.Tensor, g: torch.Generator) -> None:
        t.normal_(0.0, std, generator=g)
    return fill


def uniform(low: float, high: float) -> Fill:
    def fill(t: torch.Tensor, g: torch.Generator) -> None:
        t.uniform_(low, high, generator=g)
    return fill


def ones(t: torch.Tensor, g: torch.Generator) -> None:  # noqa: ARG001
    t.fill_(1.0)


def zeros(t: torch.Tensor, g: torch.Generator) -> None:  # noqa: ARG001
    t.zero_()


def torch_linear(fan_in: int) -> Fill:
    """nn.Linear's default for its weight and bias: U(±1/√fan_in) (kaiming_uniform with a = √5)."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(-bound, bound)


def then(fill: Fill, *post: Callable[[torch.Tensor], None]) -> Fill:
    """`fill`, then deterministic in-place transforms of the whole tensor (e.g. a row renormalisation)."""
    def run(t: torch.Tensor, g: torch.Generator) -> None:
        fill(t, g)
        for f in post:
            f(t)
    return run


def prefixed(prefix: str, rules: dict[str, Fill]) -> dict[str, Fill]:
    return {f"{prefix}.{k}": v for k, v in rules.items()}


def norm_rules(norm: nn.Module) -> dict[str, Fill]:
    """RMSNorm / LayerNorm: gain 1, bias 0."""
    return {n: (ones if n == "weight" else zeros) for n, _ in norm.named_parameters()}


def fill_parameter(rules: dict[str, Fill], name: str, t: torch.Tensor, seed: int) -> None:
    """Fill full-size `t` by its rule; drawn on the CPU (generators are per device), so every device and
    layout gets the same bits."""
    if name not in rules:
        raise KeyError(f"no init rule for parameter {name!r}; the model's init_rules() names: {', '.join(sorted(rules))}")
    with torch.no_grad():
        host = t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype)
        rules[name](host, param_generator(seed, name))
        if host is not t:
            t.copy_(host)


def init_buffers(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()


@torch.no_grad()
def init_module(module: nn.Module, rules: dict[str, Fill], seed: int | None = None) -> None:
    """Fill every parameter of a full-size module by its rule (names as `named_parameters` gives them,
    tied weights once) and recompute derived buffers. `seed` None: one drawn from torch's RNG."""
    if any(p.is_meta for p in module.parameters()):
        return  # built on the meta device: shapes only, nothing to fill (and no RNG draw)
    seed = seed_from_rng() if seed is None else seed
    unused = set(rules) - {n for n, _ in module.named_parameters()}
    if unused:
        raise KeyError(f"init rules for parameters the module does not have: {', '.join(sorted(unused))}")
    for name, p in module.named_parameters():
        fill_parameter(rules, name, p.data, seed)
    init_buffers(module)
