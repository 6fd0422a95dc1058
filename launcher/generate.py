"""`launcher generate`: text from a job's checkpoint, decoded incrementally through the architecture's own
cache (models/generation.py), in this process on the CPU; the job's tokenizer encodes and decodes."""
from __future__ import annotations

import time
from typing import Any

import torch

from data_pipeline.tokenizer import EOT, load_tokenizer
from launcher.errors import UserError
from launcher.evaluate import load_checkpoint_model
from models.generation import can_generate, generate

TOKENIZER = "tokenizer.json"


def run_generate(target: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> dict[str, Any]:
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    loaded = load_checkpoint_model(target)
    if not can_generate(loaded.model):
        raise UserError(f"model arch {loaded.spec.model.arch!r} has no incremental decoding (new_cache / step); "
                        "generation needs an architecture with a cache")
    tok = load_tokenizer(loaded.shards / TOKENIZER)
    ids = tok.encode(prompt).ids
    if not ids:
        raise UserError("--prompt encodes to no tokens; give some text")
    t0 = time.perf_counter()
    out = generate(loaded.model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   stop_token=tok.token_to_id(EOT))
    seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    return {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "prompt": prompt, "prompt_tokens": ids,
            "tokens": new, "text": tok.decode(new), "tokens_per_s": len(new) / seconds if seconds > 0 else None}
