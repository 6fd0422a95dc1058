"""A test-only architecture that enters the house through the registry alone (issue 14, must-show 1).

Two layers of `x + out(scan(in(norm(x))))`: `scan` is a per-channel decaying sum s_t = a ⊙ s_{t−1} + u_t
(a diagonal linear recurrence, Mamba's shape of state), written here as a context-parallel core by
protocol (`models.contract.SequenceCore`: a slice summary [a^L | s_L], folded by s ← a^L ⊙ s + s_L);
its decay vector is split over TP ranks by this file's own TP style (`ChannelSplit`, a `TPStyle`).
Nothing in parallel/ or launcher/ knows this module: it trains at tp2, pp2, dp2 and cp2 in the layout
harness and `launcher plan` plans it (LMFORGE_PLUGINS=toy_arch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.contract import Inputs, SequenceCore
from models.init import Fill, init_module, normal, ones, uniform
from models.layers.norm import RMSNorm
from models.registry import ModelSpec, lm_init_rules, lm_pipeline_blocks, register
from parallel.tp_styles import TPStyle, slice_parameters


@dataclass
class ToyConfig:
    arch: ClassVar[str] = "toy"

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4  # the scan's channels come in n_heads groups: TP splits whole groups
    vocab_size: int = 128
    max_seq_len: int = 64
    tie_embeddings: bool = False

    @property
    def channels(self) -> int:
        return 2 * self.d_model


class DecayScan(SequenceCore):
    """s_t = a ⊙ s_{t−1} + u_t per channel, a = sigmoid(decay) ∈ (0, 1); output s_t. State [B, C]."""

    def __init__(self, channels: int):
        super().__init__()
        self.decay = nn.Parameter(torch.empty(channels))

    def _a(self, like: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decay).to(like.dtype)

    def scan(self, inputs: Inputs, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        (u,) = inputs
        if cu_seqlens is not None:
            raise ValueError("the toy scan has no varlen form")
        a = self._a(u)
        s = u.new_zeros(u.shape[0], u.shape[2]) if initial_state is None else initial_state.to(u.dtype)
        out = []
        for t in range(u.shape[1]):
            s = a * s + u[:, t]
            out.append(s)
        return torch.stack(out, dim=1)

    def summarize(self, inputs: Inputs) -> torch.Tensor:
        (u,) = inputs
        a = self._a(u)
        return torch.stack([a.expand(u.shape[0], -1) ** u.shape[1], self.scan(inputs, None, None)[:, -1]], dim=1)

    def zero_summary(self, inputs: Inputs) -> torch.Tensor:
        (u,) = inputs
        return u.new_zeros(u.shape[0], 2, u.shape[2]) + 0 * u[:, -1:].sum()

    def fold(self, summary: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        decay, offset = summary[:, 0], summary[:, 1]
        return offset if state is None else decay * state + offset

    def forward(self, u: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.recurrence((u,), cu_seqlens)


class ChannelSplit(TPStyle):
    """This architecture's own TP style: the scan's per-channel decay follows the channels of the
    column-parallel projection before it (no collective: the scan is channel-local)."""

    name = "toy_channels"

    def sharded_dims(self, module: nn.Module) -> dict[str, int]:
        return {"decay": 0}

    def apply(self, module: nn.Module, group, sequence_parallel: bool) -> nn.Module:  # noqa: ANN001, ARG002
        return slice_parameters(module, self.sharded_dims(module), group)


class ToyLayer(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.inp = nn.Linear(cfg.d_model, cfg.channels, bias=False)
        self.scan = DecayScan(cfg.channels)
        self.out = nn.Linear(cfg.channels, cfg.d_model, bias=False)

    def init_rules(self, std: float) -> dict[str, Fill]:
        return {"norm.weight": ones, "inp.weight": normal(std), "scan.decay": uniform(0.0, 3.0),
                "out.weight": normal(std / 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.scan(self.inp(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(ToyLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_rules(self) -> dict[str, Fill]:
        return lm_init_rules(self, lambda layer: layer.init_rules(0.1), 0.1)

    def init_weights(self, seed: int | None = None) -> None:
        init_module(self, self.init_rules(), seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def num_params(cfg: ToyConfig) -> int:
    d, c = cfg.d_model, cfg.channels
    return 2 * cfg.vocab_size * d + d + cfg.n_layers * (d + 2 * d * c + c)


register(ModelSpec(
    name="toy", config_cls=ToyConfig, presets={"tiny": {}}, model_cls=Toy,
    tp_plan={"tok_embeddings": "vocab", "layers.*.inp": "colwise", "layers.*.scan": ChannelSplit(),
             "layers.*.out": "rowwise", "output": "colwise"},
    pipeline_blocks=lm_pipeline_blocks, cp_core="layers.*.scan", num_params=num_params,
))
