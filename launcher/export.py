"""`launcher export`: a job's checkpoint as a directory other tools load (issue 19).

`--format hf`: what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
read — config.json, model.safetensors, tokenizer.json + tokenizer_config.json — for the Transformer++ (a
Llama; Qwen2 with q/k/v biases). `--format safetensors`: the weights under our names (no optimizer moments)
with our config as JSON and the tokenizer, for any architecture. Both from the checkpoint's layout-free
export, in this process (no Ray, no process group); written to a temporary sibling and renamed, so a failed
export leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from data_pipeline import load_manifest
from data_pipeline.tokenizer import EOT, load_tokenizer
from launcher.errors import UserError
from launcher.evaluate import resolve_checkpoint
from launcher.orchestrator import resolve_shards
from launcher.spec import load_spec
from launcher.validate import model_config
from models import hf_interop
from parallel import checkpoint, consolidated

FORMATS = ("hf", "safetensors")
OUR_CONFIG = "lmforge_config.json"
TOKENIZER = "tokenizer.json"


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    if not (ckpt / "consolidated").is_dir():
        raise UserError(f"checkpoint {ckpt}: no consolidated export")
    tensors, _ = consolidated.read(ckpt / "consolidated")
    return {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory; nothing written")


def _write_tokenizer(directory: Path, shards: Path, cfg: Any) -> int:
    """tokenizer.json (the job's own BPE) and the tokenizer_config.json `AutoTokenizer` reads; returns EOT's id."""
    shutil.copyfile(shards / TOKENIZER, directory / TOKENIZER)
    eot = load_tokenizer(shards / TOKENIZER).token_to_id(EOT)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None, "unk_token": None,
         "model_max_length": cfg.max_seq_len}, indent=1) + "\n")
    return eot


def _write_hf(directory: Path, cfg: Any, state: dict[str, torch.Tensor], shards: Path) -> None:
    hf_interop.write_dir(directory, cfg, state)
    eot = _write_tokenizer(directory, shards, cfg)
    config = json.loads((directory / hf_interop.CONFIG).read_text())
    config |= {"eos_token_id": eot, "bos_token_id": None, "pad_token_id": None}
    (directory / hf_interop.CONFIG).write_text(json.dumps(config, indent=1) + "\n")


def _write_safetensors(directory: Path, cfg: Any, state: dict[str, torch.Tensor], shards: Path, step: int) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / hf_interop.WEIGHTS))
    (directory / OUR_CONFIG).write_text(json.dumps(
        {"arch": cfg.arch, "config": dataclasses.asdict(cfg), "step": step}, indent=1) + "\n")
    _write_tokenizer(directory, shards, cfg)


def export(target: str, fmt: str, out: str) -> dict[str, Any]:
    """Write checkpoint `target` (a job name or a checkpoint directory) to `out` in `fmt`; returns what was written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}")
    job, ckpt = resolve_checkpoint(target)
    spec = load_spec(job.spec)
    shards = resolve_shards(spec)
    cfg = model_config(spec, vocab_size=load_manifest(shards).vocab_size)
    if fmt == "hf" and cfg.arch != "transformer":
        raise UserError(f"--format hf: model arch {cfg.arch!r} has no transformers class (the Transformer++ exports "
                        "as a Llama); allowed for it: --format safetensors")
    out_dir = Path(out)
    _check_out(out_dir)
    state = _weights(ckpt)
    step = checkpoint.read_manifest(ckpt)["step"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if fmt == "hf":
            _write_hf(tmp, cfg, state, shards)
        else:
            _write_safetensors(tmp, cfg, state, shards, step)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"checkpoint": str(ckpt), "step": step, "format": fmt, "out": str(out_dir),
            "files": sorted(p.name for p in out_dir.iterdir())}
