"""Auxiliary losses travel with the activations through DeepSpeed's pipeline: blocks that return
(h, aux) on both stages of pp2 train exactly like one process minimising ce + Σ aux."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, GLOBAL, MICRO, SEQ, VOCAB, D = 4, 8, 2, 8, 64, 32


class _AuxBlock(nn.Module):
    """A residual MLP that also returns a penalty on its activations (as MoE load balancing does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = h + torch.tanh(self.fc(h))
        return out, 0.1 * out.pow(2).mean()


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(_AuxBlock() for _ in range(4))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, aux = self.emb(tokens), 0.0
        for b in self.blocks:
            h, a = b(h)
            aux = aux + a
        return self.head(h), aux


def _train(rank: int, world: int) -> dict:
    from models.registry import PipeBlock
    from parallel.engine import EngineConfig, build_engine
    from parallel.pipeline import build_pipeline, canonical_parameters
    from parallel.step import ModelLoss, lm_loss, train_step
    from parallel.topology import Topology, build_groups

    torch.manual_seed(0)
    model = _Toy()
    topo = Topology(pp=world)
    groups = build_groups(topo, rank)
    if world > 1:
        blocks = [PipeBlock(model.emb), *(PipeBlock(b) for b in model.blocks), PipeBlock(model.head)]
        module = build_pipeline(model, blocks, topo, ModelLoss(lm_loss, torch.sum), partition="uniform")
        loss_fn = lm_loss
    else:
        module = model

        def loss_fn(out, targets):  # noqa: ANN001, ANN202
            logits, aux = out
            return lm_loss(logits, targets) + aux
    accum = GLOBAL // MICRO
    engine = build_engine(module, EngineConfig(micro_batch=MICRO, grad_accum=accum, dp=1, zero=1, lr=1e-2, eps=1e-4,
                                               total_steps=STEPS), groups)
    g = torch.Generator().manual_seed(5)
    losses = [train_step(engine, list(torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g).chunk(accum)),
                         torch.device("cpu"), loss_fn).loss for _ in range(STEPS)]
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in canonical_parameters(engine.module)}}


def test_aux_losses_cross_pipeline_stages():
    ref = spawn_ranks(_train, 1)[0]
    seen = set()
    for r in spawn_ranks(_train, 2):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert_state_close({k: ref["params"][k] for k in r["params"]}, r["params"], rel=1e-5)
        seen |= set(r["params"])
    assert seen == set(ref["params"])
