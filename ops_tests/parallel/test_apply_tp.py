"""Transformer++ sharded by its own TP plan on 2 gloo ranks: vocab-sharded logits, loss and every
gradient equal the single-device model's (fp32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spawn_ranks import spawn_ranks

VOCAB, SEQ = 128, 12


def _model(tie: bool, n_kv_heads: int):
    import models

    torch.manual_seed(0)
    cfg = models.make_config("transformer", "tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                             n_kv_heads=n_kv_heads, max_seq_len=SEQ, tie_embeddings=tie)
    return models.build(cfg)


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(5))


def _sharded(rank: int, world: int, tie: bool, n_kv_heads: int) -> dict:
    import torch.distributed as dist

    import models
    from parallel.apply_tp import apply_tensor_parallel
    from parallel.tensor import vocab_parallel_cross_entropy

    model = apply_tensor_parallel(_model(tie, n_kv_heads), models.get_spec("transformer").tp_plan, dist.group.WORLD)
    tokens = _tokens()
    logits = model(tokens[:, :-1])
    loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], rank * VOCAB // world, dist.group.WORLD)
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.item(), "tied": model.output.weight is model.tok_embeddings.weight,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("tie,n_kv_heads", [(False, 4), (True, 2)])
def test_tp2_transformer_equals_single_device(tie, n_kv_heads):
    import models

    model = _model(tie, n_kv_heads)
    tokens = _tokens()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    full = {n: p.grad for n, p in model.named_parameters()}
    rows = ("tok_embeddings", "output", "wq", "wk", "wv", "w_gate", "w_up")  # sharded on dim 0
    for rank, r in enumerate(spawn_ranks(_sharded, 2, tie, n_kv_heads)):
        assert r["tied"] == tie
        torch.testing.assert_close(r["logits"], logits.detach().chunk(2, dim=-1)[rank], rtol=1e-5, atol=1e-6)
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert r["grads"].keys() == full.keys()
        for name, g in full.items():
            if any(f".{k}." in f".{name}" for k in rows):
                want = g.chunk(2, dim=0)[rank]
            elif ".wo." in name or ".w_down." in name:
                want = g.chunk(2, dim=1)[rank]
            else:
                want = g  # norms: replicated
            torch.testing.assert_close(r["grads"][name], want, rtol=1e-4, atol=1e-6, msg=name)
