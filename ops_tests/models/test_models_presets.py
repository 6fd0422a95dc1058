import pytest
import torch

import models
from models.transformer import flops_per_token, num_params

PRESETS = sorted(models.get_spec("transformer").presets)


def _count_unique(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already dedups shared tensors


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_matches_analytic_count(preset, tie):
    cfg = models.make_config("transformer", preset, vocab_size=32000, tie_embeddings=tie)
    with torch.device("meta"):
        model = models.build(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert _count_unique(model) == num_params(cfg)


def test_1p3b_size_and_shapes():
    cfg = models.make_config("transformer", "1.3b", vocab_size=32000)
    assert 1.2e9 < num_params(cfg) < 1.5e9
    assert cfg.head_dim == 128 and cfg.ffn_hidden == 5504
    with torch.device("meta"):
        model = models.build(cfg)
    assert model.tok_embeddings.weight.shape == (32000, 2048)
    assert model.output.weight.shape == (32000, 2048)
    assert len(model.layers) == 24
    block = model.layers[0]
    assert block.attn.wq.weight.shape == (2048, 2048)
    assert block.attn.wk.weight.shape == (2048, 2048)
    assert block.mlp.w_gate.weight.shape == (5504, 2048)
    assert block.mlp.w_down.weight.shape == (2048, 5504)
    assert block.attn.rope.cos.shape == (2048, 64)


def test_gqa_shapes_and_count():
    cfg = models.make_config("transformer", "125m", vocab_size=1000, n_kv_heads=4)
    with torch.device("meta"):
        model = models.build(cfg)
    assert model.layers[0].attn.wk.weight.shape == (4 * 64, 768)
    assert _count_unique(model) == num_params(cfg)


def test_flops_per_token():
    cfg = models.make_config("transformer", "tiny", vocab_size=1000)
    matmul_params = num_params(cfg) - 1000 * 128  # every weight but the embedding lookup
    assert flops_per_token(cfg, 256) == 6 * matmul_params + 12 * 4 * 128 * 256
    tied = models.make_config("transformer", "tiny", vocab_size=1000, tie_embeddings=True)
    # Tying saves parameters, not work: the output matmul still runs.
    assert flops_per_token(tied, 256) == flops_per_token(cfg, 256)
