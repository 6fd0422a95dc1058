"""Byte-level BPE tokenizer: train, load, identify."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kernels.fileio import atomic_write

from .corpus import Document
from .errors import DataError

log = logging.getLogger("lmforge." + __name__)

EOT = "<|endoftext|>"


def train_bpe(docs: Sequence[Document], vocab_size: int, out_path: Path) -> Tokenizer:
    """Train a byte-level BPE (EOT special token) on `docs` and save it as `out_path`.

    Same documents in the same order give a byte-identical tokenizer.json.
    """
    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small for {out_path}: byte-level BPE needs >= 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 bytes up front so any text encodes, even bytes unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.info("training byte-level BPE (vocab %d) on %d documents", vocab_size, len(docs))
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    atomic_write(Path(out_path), tok.to_str())
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for every failure
        raise DataError(f"cannot load tokenizer {path}: {e}") from e


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token appended after every document."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise DataError(f"tokenizer has no {EOT} token")
    return i
