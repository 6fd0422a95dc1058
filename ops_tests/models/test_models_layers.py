import math

import torch

import models
from models.layers.mlp import SwiGLU
from models.layers.norm import RMSNorm
from models.layers.rope import RotaryEmbedding
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


def _exact_rope(x: torch.Tensor, theta: float, start: int = 0) -> torch.Tensor:
    """HF Llama's formula, x·cos + rotate_half(x)·sin, with angles from Python floats (independent of
    the module's tables): x [B, T, H, D] float64."""
    T, D = x.shape[1], x.shape[-1]
    angles = torch.tensor([[(start + t) * theta ** (-2 * i / D) for i in range(D // 2)] for t in range(T)],
                          dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rope_float64_is_exact():
    # Rotating in fp32 (or with fp32 tables) is off by ~1e-7; float64 must rotate in float64 (~1e-16).
    x = torch.randn(2, 40, 3, 16, dtype=torch.float64)
    rope = RotaryEmbedding(16, 64, theta=500.0)
    for start in (0, 7):
        got = rope(x, start=start)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, _exact_rope(x, 500.0, start), rtol=0, atol=1e-14)
    # A float64 model (tables built with it, then `.double()`) rotates exactly too.
    cfg = models.make_config("transformer", "tiny", vocab_size=64, max_seq_len=48)
    model = models.build(cfg).double()
    rope = model.layers[1].attn.rope
    assert abs(rope.cos[47, 1].item() - math.cos(47 * 10000.0 ** (-2 / rope.head_dim))) < 1e-15
    xd = torch.randn(1, 48, 2, rope.head_dim, dtype=torch.float64)
    torch.testing.assert_close(rope(xd), _exact_rope(xd, 10000.0), rtol=0, atol=1e-14)


def test_rope_tables_survive_module_casts():
    # `model.bfloat16()` / `.to(dtype)` reach buffers: the tables must not be rounded to bf16 on the way.
    cfg = models.make_config("transformer", "tiny", vocab_size=64, max_seq_len=48)
    model = models.build(cfg)
    exact = model.layers[0].attn.rope.cos.clone()
    model.bfloat16()
    rope = model.layers[0].attn.rope
    x = torch.randn(2, 48, 2, rope.head_dim).bfloat16()
    fp32_rope = RotaryEmbedding(rope.head_dim, 48)
    # bf16 rotates in fp32 with fp32 tables: bit-equal to an fp32 module on the same (bf16-valued) input.
    assert torch.equal(rope(x), fp32_rope(x.float()).bfloat16())
    assert model.output.weight.dtype == torch.bfloat16 and rope.cos.dtype == torch.float64
    model.to(torch.float32)
    assert torch.equal(rope.cos, exact) and rope.cos.dtype == torch.float64
    with torch.device("meta"):
        meta = RotaryEmbedding(16, 8)
    meta.to(torch.float16).to_empty(device="cpu")  # dtype casts before materialising change nothing either
    meta.reset_parameters()
    assert meta.cos.dtype == torch.float64 and torch.equal(meta.cos, RotaryEmbedding(16, 8).cos)
