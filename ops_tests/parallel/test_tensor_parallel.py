"""Tensor-parallel layers on 2 gloo ranks equal their single-device counterparts, forward and backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spawn_ranks import spawn_ranks

VOCAB, D, TOKENS = 64, 16, 12


def _full_inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, TOKENS // 3, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (3, TOKENS // 3), generator=g)
    return logits, targets


def _cross_entropy(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from parallel.tensor import vocab_parallel_cross_entropy

    logits, targets = _full_inputs()
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, rank * (VOCAB // world), dist.group.WORLD)
    loss.backward()
    return {"loss": loss.item(), "grad": shard.grad}


def test_vocab_parallel_cross_entropy_equals_full_forward_and_gradient():
    logits, targets = _full_inputs()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.flatten(0, 1), targets.flatten())
    ref.backward()
    out = spawn_ranks(_cross_entropy, 2)
    for rank, r in enumerate(out):
        assert abs(r["loss"] - ref.item()) <= 1e-6 * abs(ref.item())
        torch.testing.assert_close(r["grad"], full.grad.chunk(2, dim=-1)[rank], rtol=1e-5, atol=1e-7)


def _modules():
    torch.manual_seed(0)
    return nn.Embedding(VOCAB, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)


def _forward(emb, up, down, tokens):
    return down(F.silu(up(emb(tokens)))).pow(2).mean()


def _mlp(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    emb, up, down = _modules()
    g = dist.group.WORLD
    pe, pu, pd = VocabParallelEmbedding.from_full(emb, g), ColumnParallelLinear.from_full(up, g), RowParallelLinear.from_full(down, g)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    loss = _forward(pe, pu, pd, tokens)
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad for m, n0 in ((pe, "emb"), (pu, "up"), (pd, "down"))
                                           for n, p in ((f"{n0}.{k}", v) for k, v in m.named_parameters())}}


def test_column_row_and_vocab_parallel_layers_equal_the_full_model():
    emb, up, down = _modules()
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    ref = _forward(emb, up, down, tokens)
    ref.backward()
    shard_dim = {"emb.weight": 0, "up.weight": 0, "up.bias": 0, "down.weight": 1, "down.bias": None}
    full = {"emb.weight": emb.weight.grad, "up.weight": up.weight.grad, "up.bias": up.bias.grad,
            "down.weight": down.weight.grad, "down.bias": down.bias.grad}
    for rank, r in enumerate(spawn_ranks(_mlp, 2)):
        assert abs(r["loss"] - ref.item()) <= 1e-5 * abs(ref.item())
        for name, dim in shard_dim.items():
            want = full[name] if dim is None else full[name].chunk(2, dim=dim)[rank]
            torch.testing.assert_close(r["grads"][name], want, rtol=1e-5, atol=1e-7, msg=name)
