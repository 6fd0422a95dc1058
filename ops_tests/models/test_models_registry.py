import pytest
import torch

import models
from models.transformer import Transformer, TransformerConfig


def test_registry_lists_transformer():
    assert "transformer" in models.names()
    spec = models.get_spec("transformer")
    assert spec.config_cls is TransformerConfig and spec.model_cls is Transformer
    assert {"tiny", "125m", "350m", "760m", "1.3b"} <= set(spec.presets)


def test_preset_then_overrides():
    cfg = models.make_config("transformer", "125m", vocab_size=32000, n_layers=2)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size) == (768, 12, 2, 32000)
    assert cfg.n_kv_heads == 12 and cfg.ffn_hidden == 2048  # 8/3*768 = 2048, already a multiple of 64
    assert models.make_config("transformer", "tiny").ffn_hidden == 384  # 341 rounded up to 64
    # The preset table itself is not mutated by overrides.
    assert models.get_spec("transformer").presets["125m"]["n_layers"] == 12


def test_unknown_arch_lists_names():
    with pytest.raises(ValueError, match="transformer") as e:
        models.get_spec("gpt5")
    assert "gpt5" in str(e.value)
    with pytest.raises(ValueError, match="transformer"):
        models.make_config("gpt5", "tiny")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"'huge'.*tiny.*1\.3b"):
        models.make_config("transformer", "huge")


def test_unknown_override_lists_fields():
    with pytest.raises(ValueError, match=r"d_modle.*d_model.*n_heads"):
        models.make_config("transformer", "tiny", d_modle=64)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=130), "d_model"),  # 130 % 4 != 0
        (dict(n_kv_heads=3), "n_kv_heads"),  # 4 % 3 != 0
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(d_model="128"), "d_model"),
        (dict(ffn_hidden=0), "ffn_hidden"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(d_model=12, n_heads=4), "head_dim"),  # odd head_dim cannot be rotated
    ],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        models.make_config("transformer", "tiny", **overrides)


def test_build_rejects_foreign_config():
    with pytest.raises(ValueError, match="transformer"):
        models.build(object())


def test_register_rejects_clash():
    spec = models.get_spec("transformer")
    models.register(spec)  # re-registering the same class is a no-op (module reloads)
    clash = models.ModelSpec("transformer", TransformerConfig, {}, torch.nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        models.register(clash)
    assert models.get_spec("transformer") is spec
