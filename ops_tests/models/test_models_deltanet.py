"""DeltaNet LM and hybrids: recurrent generation equals the parallel forward at every position; varlen
packing equals separate sequences; presets and parameter counts; the short conv against conv1d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from compare import err_ratio
from models.layers.short_conv import ShortConv

VARIANTS = {
    "deltanet": dict(),
    "gated+output-gate": dict(decay_gate=True, output_gate=True, allow_neg_eigval=True),
    "swa": dict(hybrid="swa", window=5),
    "global": dict(hybrid="global", attn_layers=[2]),
}


def _model(**overrides):  # noqa: ANN202
    torch.manual_seed(0)
    cfg = models.make_config("deltanet", "tiny", d_model=64, n_layers=3, n_heads=4, vocab_size=97, chunk_size=16,
                             **overrides)
    return models.build(cfg).double()


@pytest.mark.parametrize("variant", VARIANTS)
def test_recurrent_generation_equals_parallel_forward(variant):
    m = _model(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(1))  # > 2 chunks, > window
    with torch.no_grad():
        parallel = m(tokens)
    recurrent = m.forward_recurrent(tokens)
    assert err_ratio(parallel, recurrent) <= 1e-10
    for t in (0, 16, 40):  # every position, incl. the first and across chunk edges
        assert err_ratio(parallel[:, t], recurrent[:, t]) <= 1e-10


def test_generation_state_is_constant_size():
    m = _model()
    cache = m.new_cache()
    sizes = []
    for t in range(20):
        m.step(torch.tensor([t % 97]), cache)
        sizes.append(sum(v.numel() for c in cache for v in c.values()))
    assert len(set(sizes[3:])) == 1  # after the conv window fills: O(1) per token


def test_varlen_packing_equals_separate_sequences():
    m = _model(decay_gate=True)
    a, b = torch.randint(0, 97, (1, 23)), torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        packed = m(torch.cat([a, b], dim=1), cu_seqlens=torch.tensor([0, 23, 32]))
        alone = torch.cat([m(a), m(b)], dim=1)
    assert err_ratio(alone, packed) <= 1e-10


def test_short_conv_equals_causal_conv1d():
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight[:, None], groups=6).transpose(1, 2)
    assert err_ratio(ref, conv(x)) <= 1e-12


def test_presets_and_parameter_count():
    cfg = models.make_config("deltanet", "1.3b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_dim) == (2048, 24, 16, 128)
    with torch.device("meta"):
        m = models.build(cfg)
    assert models.get_spec("deltanet").num_params(cfg) == sum(p.numel() for p in m.parameters())
    assert 1.2e9 < models.get_spec("deltanet").num_params(cfg) < 1.45e9
    assert models.make_config("deltanet", "1.3b", hybrid="global").attn_layers == [2, 11]
    assert models.make_config("deltanet", "tiny", hybrid="swa").attn_layers == [2, 4]


@pytest.mark.parametrize("overrides,fragment", [
    (dict(hybrid="mamba"), "none, swa, global"), (dict(attn_layers=[0]), "1..n_layers"),
    (dict(chunk_size=48), "16, 32, 64"), (dict(kernel_backend="cuda"), "auto, torch, triton"),
])
def test_bad_config_names_field_and_allowed(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        models.make_config("deltanet", "tiny", **overrides)
