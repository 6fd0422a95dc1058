"""Hugging Face `transformers` checkpoints ↔ our Transformer++: configs and parameter names (issue 19).

Our Transformer++ is a Llama: pre-norm RMSNorm, rotary GQA attention in the rotate-half layout HF uses,
SwiGLU MLP, an optional tied head. So its weights, renamed, load into `LlamaForCausalLM` (and Qwen2's, whose
q/k/v projections carry biases: our `attn_bias`) and back, with no permutation. Pure dictionaries and
tensors: nothing here imports `transformers` (reading and writing a checkpoint directory needs only JSON and
safetensors), and nothing runs code from a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class HFFormatError(ValueError):
    """A Hugging Face directory this module cannot convert (the message names the field and the allowed values)."""


def _layer_names(i: int) -> dict[str, str]:
    """Our parameter name -> HF's, for layer i (the biases only where the config has them)."""
    ours, hf = f"layers.{i}", f"model.layers.{i}"
    names = {f"{ours}.attn_norm.weight": f"{hf}.input_layernorm.weight",
             f"{ours}.mlp_norm.weight": f"{hf}.post_attention_layernorm.weight",
             f"{ours}.attn.wo.weight": f"{hf}.self_attn.o_proj.weight",
             f"{ours}.mlp.w_gate.weight": f"{hf}.mlp.gate_proj.weight",
             f"{ours}.mlp.w_up.weight": f"{hf}.mlp.up_proj.weight",
             f"{ours}.mlp.w_down.weight": f"{hf}.mlp.down_proj.weight"}
    for p in "qkv":
        names[f"{ours}.attn.w{p}.weight"] = f"{hf}.self_attn.{p}_proj.weight"
        names[f"{ours}.attn.w{p}.bias"] = f"{hf}.self_attn.{p}_proj.bias"
    return names


def name_map(cfg: Any) -> dict[str, str]:
    """Every parameter of `cfg`'s Transformer++ -> its HF name (a tied head: the embedding alone)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        names |= {k: v for k, v in _layer_names(i).items() if cfg.attn_bias or not k.endswith(".bias")}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def hf_config(cfg: Any) -> dict[str, Any]:
    """config.json of the `transformers` model equal to `cfg` (Llama; Qwen2 when q/k/v have biases)."""
    model_type = "qwen2" if cfg.attn_bias else "llama"
    out = {"architectures": [HF_MODEL_TYPES[model_type]], "model_type": model_type,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "rope_theta": cfg.rope_theta, "initializer_range": cfg.init_std, "dtype": "float32"}
    if model_type == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None}
    return out


def _require(config: dict[str, Any], key: str, allowed: tuple, default: Any = None) -> None:
    value = config.get(key, default)
    if value not in allowed:
        raise HFFormatError(f"{CONFIG}: {key}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def transformer_fields(config: dict[str, Any]) -> dict[str, Any]:
    """TransformerConfig fields of a HF Llama / Qwen2 config.json; anything else is refused by name."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise HFFormatError(f"{CONFIG}: model_type={model_type!r} is not supported; allowed: {', '.join(HF_MODEL_TYPES)}")
    _require(config, "hidden_act", ("silu",), "silu")
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"{CONFIG}: rope_parameters.rope_type={rope.get('rope_type')!r} is not supported; "
                            "allowed: 'default'")
    if model_type == "llama":
        _require(config, "attention_bias", (False,), False)  # Llama's bias would be on o_proj too
        _require(config, "mlp_bias", (False,), False)
    else:
        _require(config, "use_sliding_window", (False,), False)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise HFFormatError(f"{CONFIG}: head_dim={head_dim} × num_attention_heads={heads} != hidden_size={d}; "
                            "allowed: head_dim = hidden_size / num_attention_heads")
    return dict(d_model=d, n_layers=config["num_hidden_layers"], n_heads=heads,
                n_kv_heads=config.get("num_key_value_heads") or heads, ffn_hidden=config["intermediate_size"],
                vocab_size=config["vocab_size"], max_seq_len=config.get("max_position_embeddings", 2048),
                rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=config.get("rms_norm_eps", 1e-6),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)), attn_bias=model_type == "qwen2")


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise HFFormatError(f"{directory}: no {CONFIG} (a Hugging Face model directory has one)")
    return json.loads(path.read_text())


def read_state(directory: Path, cfg: Any) -> dict[str, torch.Tensor]:
    """Our parameter name -> tensor, from the directory's safetensors files (sharded or not)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise HFFormatError(f"{directory}: no *.safetensors weights (only safetensors are read: never pickles)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf |= load_file(str(f))
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some writers store the tied head too
    names = name_map(cfg)
    missing = sorted(h for h in names.values() if h not in hf)
    if missing:
        raise HFFormatError(f"{directory}: weights missing for {', '.join(missing[:5])}"
                            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    return {ours: hf[h] for ours, h in names.items()}


def write_dir(directory: Path, cfg: Any, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors of `cfg`'s model with our `state` (tensors under our names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {h: state[ours].detach().contiguous().cpu() for ours, h in name_map(cfg).items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(hf_config(cfg), indent=1) + "\n")


def load_model(directory: Path, **overrides: Any) -> tuple[Any, torch.nn.Module]:
    """(config, Transformer++ with the directory's weights) of a HF Llama / Qwen2 directory, in one process.
    `overrides`: other TransformerConfig fields (the directory's shapes win)."""
    from models.registry import build, make_config

    cfg = make_config("transformer", "tiny", **{**overrides, **transformer_fields(read_config(directory))})
    with torch.device("meta"):
        model = build(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)  # derived buffers (rotary tables); every parameter is then overwritten
    state = read_state(directory, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    return cfg, model
