"""Incremental decoding for any architecture with a cache (`new_cache()` and `step(tokens [B], cache)`):
the prompt is fed token by token through the cache (every arch's step is exact: a KV cache, DeltaNet's
state), then tokens are drawn one at a time — greedy at temperature 0, else softmax(logits / t) restricted
to the top-p nucleus, from a seeded generator so a run repeats.
"""
from __future__ import annotations

import torch
from torch import nn


def can_generate(model: nn.Module) -> bool:
    return callable(getattr(model, "new_cache", None)) and callable(getattr(model, "step", None))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]: argmax at temperature 0, else a draw from the top-p nucleus of
    softmax(logits / temperature) (the smallest set of most likely tokens whose mass reaches top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_token: int | None = None) -> torch.Tensor:
    """prompt [B, T0] (T0 ≥ 1) -> [B, T0 + n] with n ≤ max_new_tokens new tokens (fewer when every row has
    produced `stop_token`), never past the model's max_seq_len."""
    if not can_generate(model):
        raise ValueError(f"{type(model).__name__} has no incremental decoding (new_cache / step)")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, tokens] with at least one token, got {tuple(prompt.shape)}")
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if limit is not None:
        max_new_tokens = max(0, min(max_new_tokens, limit - prompt.shape[1]))
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = model.new_cache()
    logits = None
    for t in range(prompt.shape[1]):
        logits = model.step(prompt[:, t], cache)
    out, done = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits.float(), temperature, top_p, generator)
        out.append(nxt[:, None])
        if stop_token is not None:
            done |= nxt == stop_token
            if done.all():
                break
        if i + 1 < max_new_tokens:
            logits = model.step(nxt, cache)
    return torch.cat(out, dim=1)
