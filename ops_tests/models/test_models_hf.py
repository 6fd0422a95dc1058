"""Hugging Face interop (issue 19, must-show 3, one process): tiny random `transformers` Llama and Qwen2
models, created and saved here (no hub), load into our Transformer++ with equal logits; our Transformer++
written as a HF directory loads into `LlamaForCausalLM` / `Qwen2ForCausalLM` with equal logits; tied and
untied, GQA; unsupported directories are refused naming the field."""
from __future__ import annotations

import json

import pytest
import torch
import transformers  # a test dependency (pyproject's `test` extra), never imported by the package

import models
from models import hf_interop
V, T = 97, 11


def _hf_model(kind: str, tie: bool, kv: int) -> torch.nn.Module:
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # HF zero-inits biases and sets unit norm gains: randomise so every weight shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,tie,kv", [("llama", False, 2), ("llama", True, 4), ("qwen2", False, 2), ("qwen2", True, 1)])
def test_a_hf_checkpoint_loads_with_equal_logits(tmp_path, kind: str, tie: bool, kv: int):
    hf = _hf_model(kind, tie, kv)
    hf.save_pretrained(tmp_path)  # safetensors
    cfg, ours = hf_interop.load_model(tmp_path)
    assert (cfg.attn_bias, cfg.tie_embeddings, cfg.n_kv_heads) == (kind == "qwen2", tie, kv)
    with torch.no_grad():
        want = hf(_tokens()).logits
        got = ours.eval()(_tokens())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie,kv,bias", [(False, 2, False), (True, 4, False), (False, 2, True)])
def test_our_model_written_as_hf_loads_in_transformers_with_equal_logits(tmp_path, tie: bool, kv: int, bias: bool):
    cfg = models.make_config("transformer", "tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=V,
                             max_seq_len=64, tie_embeddings=tie, attn_bias=bias)
    ours = models.build(cfg, seed=3).eval()
    with torch.no_grad():  # unit gains and zero biases would hide a swapped name
        for n, p in ours.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_interop.write_dir(tmp_path, cfg, dict(ours.named_parameters()))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if bias else "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_tokens()).logits, ours(_tokens()), rtol=1e-5, atol=1e-5)
    _, back = hf_interop.load_model(tmp_path)  # and back: the same parameters
    for (n, a), (m, b) in zip(ours.named_parameters(), back.named_parameters()):
        assert n == m and torch.equal(a, b), n


@pytest.mark.parametrize("edit,words", [
    (dict(model_type="mistral"), ["model_type='mistral'", "llama, qwen2"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'", "'silu'"]),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), ["rope_type='yarn'", "'default'"]),
    (dict(attention_bias=True), ["attention_bias=True", "False"]),
])
def test_unsupported_directories_are_refused_naming_the_field(tmp_path, edit: dict, words: list[str]):
    _hf_model("llama", False, 2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(hf_interop.HFFormatError) as e:
        hf_interop.load_model(tmp_path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_weights_and_pickles_are_refused(tmp_path):
    _hf_model("llama", False, 2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # a pickle is never read
    with pytest.raises(hf_interop.HFFormatError, match="no \\*.safetensors weights"):
        hf_interop.load_model(tmp_path)
