import torch

import models
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.transformer import TransformerBlock


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_rmsnorm_eps_is_used():
    x = torch.zeros(1, 4)
    x[0, 0] = 1e-3
    assert not torch.allclose(RMSNorm(4, eps=1.0)(x), RMSNorm(4, eps=1e-12)(x))


def test_swiglu_formula():
    mlp = SwiGLU(16, 40)
    assert mlp.w_gate.bias is None and mlp.w_down.weight.shape == (16, 40)
    x = torch.randn(2, 16)
    g, u = x @ mlp.w_gate.weight.T, x @ mlp.w_up.weight.T
    torch.testing.assert_close(mlp(x), (g * torch.sigmoid(g) * u) @ mlp.w_down.weight.T)


def test_block_is_pre_norm():
    # Pre-norm: branches only see normalised input, so zero norm gains make the block the identity.
    block = TransformerBlock(models.make_config("transformer", "tiny", vocab_size=256, max_seq_len=64))
    with torch.no_grad():
        block.attn_norm.weight.zero_()
        block.mlp_norm.weight.zero_()
    x = torch.randn(2, 8, 128)
    torch.testing.assert_close(block(x), x)
