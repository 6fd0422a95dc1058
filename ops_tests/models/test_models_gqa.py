import math

import torch

import models
from models.layers.attention import Attention


def _reference_attention(attn: Attention, x: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Written out by hand: explicit repeat_interleave of k/v and a masked softmax."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.rope(attn.wq(x).view(B, T, n_heads, hd)).transpose(1, 2)
    k = attn.rope(attn.wk(x).view(B, T, n_kv, hd)).transpose(1, 2)
    v = attn.wv(x).view(B, T, n_kv, hd).transpose(1, 2)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_gqa_matches_repeat_interleave_reference():
    attn = Attention(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=10000.0)
    assert attn.wk.weight.shape == (2 * 8, 64)
    x = torch.randn(2, 12, 64)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, 8, 2), rtol=1e-5, atol=1e-6)


def test_mha_matches_reference():
    attn = Attention(dim=64, n_heads=4, n_kv_heads=4, max_seq_len=32, rope_theta=10000.0)
    x = torch.randn(2, 12, 64)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, 4, 4), rtol=1e-5, atol=1e-6)


def test_gqa_is_not_mha():
    # Guards the reference test: sharing kv heads must actually change the result.
    attn = Attention(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=10000.0)
    x = torch.randn(1, 8, 64)
    wrong = _reference_attention_tiled(attn, x)
    assert (attn(x) - wrong).abs().max() > 1e-4


def _reference_attention_tiled(attn, x):
    # repeat() instead of repeat_interleave(): query head i paired with kv head i % n_kv (wrong grouping).
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.rope(attn.wq(x).view(B, T, 8, hd)).transpose(1, 2)
    k = attn.rope(attn.wk(x).view(B, T, 2, hd)).transpose(1, 2).repeat(1, 4, 1, 1)
    v = attn.wv(x).view(B, T, 2, hd).transpose(1, 2).repeat(1, 4, 1, 1)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_local_heads_inferred_from_shapes():
    # A TP rank holding half the heads (whole kv groups) runs the same module on sliced weights.
    full = Attention(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=10000.0)
    half = Attention(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=10000.0)
    hd = full.head_dim
    with torch.no_grad():
        half.wq.weight = torch.nn.Parameter(full.wq.weight[: 4 * hd].clone())
        half.wk.weight = torch.nn.Parameter(full.wk.weight[:hd].clone())
        half.wv.weight = torch.nn.Parameter(full.wv.weight[:hd].clone())
        half.wo.weight = torch.nn.Parameter(full.wo.weight[:, : 4 * hd].clone())
        other = Attention(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=10000.0)
        other.wq.weight = torch.nn.Parameter(full.wq.weight[4 * hd :].clone())
        other.wk.weight = torch.nn.Parameter(full.wk.weight[hd:].clone())
        other.wv.weight = torch.nn.Parameter(full.wv.weight[hd:].clone())
        other.wo.weight = torch.nn.Parameter(full.wo.weight[:, 4 * hd :].clone())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(half(x) + other(x), full(x), rtol=1e-5, atol=1e-6)


def test_tied_embeddings_share_storage_and_count_once():
    from models.transformer import num_params

    cfg = models.make_config("transformer", "tiny", vocab_size=256, max_seq_len=64, tie_embeddings=True)
    model = models.build(cfg)  # goes through meta + to_empty, which unties unless init re-ties
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    untied = models.make_config("transformer", "tiny", vocab_size=256, max_seq_len=64)
    assert num_params(cfg) == num_params(untied) - 256 * 128
    # A gradient step through both uses updates the one tensor.
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    assert model.tok_embeddings.weight.grad is model.output.weight.grad
