"""`launcher eval --tasks`: what a checkpoint is scored on (issue 19), each task a function of the loaded
checkpoint returning flat metrics (`<metric>` -> float, logged as `eval/<task>/<metric>`).

- `ppl`: held-out loss and perplexity over the job's validation samples, and the loss by position bucket
  (positions [0, 1), [1, 2), [2, 4), [4, 8), …: where long-context models should gain).
- `blimp`: the 67 BLiMP paradigms of minimal pairs (a directory of `<paradigm>.jsonl` with `sentence_good`,
  `sentence_bad`; never assumed, always a flag): a pair is right when the good sentence has the higher total
  log-probability, every token scored, the first one after the end-of-text token that separates documents.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipeline import val_batches
from data_pipeline.tokenizer import EOT, load_tokenizer
from launcher.errors import UserError


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), … up to seq_len."""
    edges = [0, 1]
    while edges[-1] < seq_len:
        edges.append(min(2 * edges[-1], seq_len))
    return list(zip(edges, edges[1:]))


@torch.no_grad()
def ppl(loaded: Any, samples: int | None = None, **_: Any) -> dict[str, float]:
    """val_loss, val_ppl, and loss_pos_<a>_<b> for each position bucket, over the first `samples` val samples."""
    manifest = loaded.manifest
    n = min(samples or manifest.val.samples, manifest.val.samples)
    total = torch.zeros(manifest.seq_len, dtype=torch.float64)
    count = 0
    for batch in val_batches(loaded.shards, micro_batch=loaded.spec.data.micro_batch, dp_rank=0, dp_size=1,
                             max_samples=n):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = _logits(loaded.model(inputs)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T]
        total += ce.double().sum(0)
        count += batch.shape[0]
    if not count:
        raise UserError(f"ppl: no validation samples in {loaded.shards}")
    per_pos = total / count
    loss = per_pos.mean().item()
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "samples": float(count)}
    for a, b in position_buckets(manifest.seq_len):
        out[f"loss_pos_{a}_{b}"] = per_pos[a:b].mean().item()
    return out


def read_blimp(directory: Path) -> dict[str, list[tuple[str, str]]]:
    """paradigm -> [(good, bad)] from `<paradigm>.jsonl` files; a missing directory or field is named."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--blimp-dir {directory}: not a directory (BLiMP's <paradigm>.jsonl files)")
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise UserError(f"--blimp-dir {directory}: no <paradigm>.jsonl files")
    out = {}
    for f in files:
        pairs = []
        for i, line in enumerate(f.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("sentence_good", "sentence_bad") if k not in row]
            if missing:
                raise UserError(f"--blimp-dir {directory}: {f.name} line {i + 1} has no {', '.join(missing)}")
            pairs.append((row["sentence_good"], row["sentence_bad"]))
        out[f.stem] = pairs
    return out


@torch.no_grad()
def sentence_logprobs(model: torch.nn.Module, sequences: list[list[int]], bos: int, batch: int = 64) -> list[float]:
    """Σ_i log p(t_i | bos, t_<i) of each token sequence (all of its tokens scored), batched by length."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(sequences[i]) for i in idx)
        tokens = torch.full((len(idx), width + 1), bos, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.bool)
        for row, i in enumerate(idx):
            tokens[row, 1:len(sequences[i]) + 1] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = True
        logp = torch.log_softmax(_logits(model(tokens[:, :-1])).double(), dim=-1)
        picked = logp.gather(-1, tokens[:, 1:, None])[..., 0].masked_fill(~mask, 0.0).sum(-1)
        for row, i in enumerate(idx):
            out[i] = picked[row].item()
    return out


def blimp(loaded: Any, blimp_dir: str | None = None, blimp_pairs: int | None = None, **_: Any) -> dict[str, float]:
    """accuracy (over every pair) and acc/<paradigm>; `blimp_pairs`: the first N pairs of each paradigm."""
    if blimp_dir is None:
        raise UserError("--tasks blimp needs --blimp-dir DIR (BLiMP's <paradigm>.jsonl files)")
    tok = load_tokenizer(loaded.shards / "tokenizer.json")
    bos = tok.token_to_id(EOT)
    out, right, total = {}, 0, 0
    for paradigm, pairs in read_blimp(Path(blimp_dir)).items():
        pairs = pairs[:blimp_pairs] if blimp_pairs else pairs
        seqs = [tok.encode(s).ids for pair in pairs for s in pair]
        scores = sentence_logprobs(loaded.model, seqs, bos)
        ok = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs)))
        out[f"acc/{paradigm}"] = ok / len(pairs) if pairs else float("nan")
        right, total = right + ok, total + len(pairs)
    out["accuracy"] = right / total if total else float("nan")
    out["pairs"] = float(total)
    return out


TASKS: dict[str, Callable[..., dict[str, float]]] = {"ppl": ppl, "blimp": blimp}


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"--tasks {text!r}: unknown task {', '.join(unknown) or '(none)'}; known: {', '.join(TASKS)}")
    return names
