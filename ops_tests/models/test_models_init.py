import math

import torch

import models
from models.layers.rope import RotaryEmbedding


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_params(tiny_cfg):
    torch.manual_seed(123)
    a = _state(models.build(tiny_cfg))
    torch.manual_seed(123)
    b = _state(models.build(tiny_cfg))
    torch.manual_seed(124)
    c = _state(models.build(tiny_cfg))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wq.weight"], c["layers.0.attn.wq.weight"])


def test_meta_to_empty_init_equals_direct_build(tiny_cfg):
    torch.manual_seed(7)
    direct = models.build(tiny_cfg)
    with torch.device("meta"):
        meta = models.build(tiny_cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.init_weights()
    for (name, p), (_, q) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(p, q), name
    for (name, b), (_, c) in zip(direct.named_buffers(), meta.named_buffers()):
        assert torch.equal(b, c), name  # rope tables are recomputed, not left as to_empty garbage
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    assert torch.equal(direct(tokens), meta(tokens))


def test_rope_buffers_after_to_empty():
    with torch.device("meta"):
        rope = RotaryEmbedding(head_dim=16, max_seq_len=32)
    rope.to_empty(device="cpu")
    rope.cos.fill_(float("nan"))
    rope.reset_parameters()
    angle = 5 * 10000.0 ** (-2 / 16)  # position 5, frequency index 1
    assert math.isclose(rope.cos[5, 1].item(), math.cos(angle), rel_tol=1e-6)
    assert math.isclose(rope.sin[5, 1].item(), math.sin(angle), rel_tol=1e-6)
    assert "cos" not in rope.state_dict()  # derived data stays out of checkpoints


def test_rope_is_relative():
    # <rope(q) at m, rope(k) at n> depends on m - n only: shift both by 3 and scores stay equal.
    rope = RotaryEmbedding(head_dim=16, max_seq_len=32)
    q, k = torch.randn(16), torch.randn(16)
    x = torch.zeros(1, 32, 2, 16)
    x[0, :, 0], x[0, :, 1] = q, k
    r = rope(x)[0]
    assert torch.allclose(r[7, 0] @ r[2, 1], r[10, 0] @ r[5, 1], atol=1e-5)
    assert not torch.allclose(r[7, 0] @ r[2, 1], r[7, 0] @ r[5, 1], atol=1e-3)
    torch.testing.assert_close(r.norm(dim=-1), x[0].norm(dim=-1))  # rotations preserve norms


def test_init_statistics():
    cfg = models.make_config("transformer", "125m", vocab_size=1000, n_layers=8, max_seq_len=64)
    model = models.build(cfg)
    std = cfg.init_std
    assert abs(model.layers[0].attn.wq.weight.std().item() - std) < 0.05 * std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    assert abs(model.layers[3].attn.wo.weight.std().item() - out_std) < 0.05 * out_std
    assert abs(model.layers[3].mlp.w_down.weight.std().item() - out_std) < 0.05 * out_std
    assert torch.equal(model.layers[1].mlp_norm.weight, torch.ones(768))
    assert torch.equal(model.norm.weight, torch.ones(768))
