"""corpus -> tokenizer -> train/val token samples -> webdataset shards + manifest."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from kernels.fileio import atomic_write, file_sha256

from .corpus import Document, builtin_documents, user_documents
from .errors import DataError
from .manifest import MANIFEST_NAME, MANIFEST_VERSION, Manifest, SplitInfo, load_manifest, save_manifest
from .shards import token_dtype, write_shards
from .split import order_documents, truncate, val_keys
from .tokenizer import eot_id, load_tokenizer, train_bpe

log = logging.getLogger("lmforge." + __name__)

TOKENIZER_NAME = "tokenizer.json"
_ENCODE_CHUNK = 16  # documents per encode_batch call: enough to use all cores, few enough for progress


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _source(corpus: str) -> str:
    return "builtin" if corpus == "builtin" else str(Path(corpus).expanduser().resolve())


def default_shards_dir(corpus: str, vocab_size: int, seq_len: int, cache_dir: Path | None = None) -> Path:
    """Where `launcher data prepare` puts shards when no --out is given."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    source = _source(corpus)
    if source == "builtin":
        name = "builtin"
    else:
        # The path hash keeps two corpora with the same folder name apart.
        name = f"{Path(source).name or 'corpus'}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
    return root / "shards" / f"{name}-v{vocab_size}-t{seq_len}"


def _corpus_sha256(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.key, d.text):
            raw = part.encode("utf-8")
            h.update(len(raw).to_bytes(8, "little"))  # length-prefixed so boundaries can't shift
            h.update(raw)
    return h.hexdigest()


def _reusable(out_dir: Path, want: Manifest, tokenizer_sha: str | None) -> Manifest | None:
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        have = load_manifest(out_dir)
    except DataError:
        return None
    params = ("source", "corpus_sha256", "tokenizer_trained", "vocab_size", "seq_len", "val_fraction",
              "max_bytes", "samples_per_shard")
    same = all(getattr(have, k) == getattr(want, k) for k in params)
    same = same and (tokenizer_sha is None or have.tokenizer_sha256 == tokenizer_sha)
    tok = out_dir / TOKENIZER_NAME
    same = same and tok.is_file() and file_sha256(tok) == have.tokenizer_sha256
    shards = have.train.shards + have.val.shards
    return have if same and all((out_dir / s.name).is_file() for s in shards) else None


def _clear(out_dir: Path) -> None:
    # The manifest goes first: a crash from here on leaves a dir that is plainly unprepared.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for pattern in ("train-*.tar", "val-*.tar", ".*.tmp", TOKENIZER_NAME):
        for p in out_dir.glob(pattern):
            p.unlink()


def _encode(tok: Tokenizer, docs: Sequence[Document], eot: int, desc: str) -> np.ndarray:
    parts = []
    for i in tqdm(range(0, len(docs), _ENCODE_CHUNK), desc=f"encode {desc}", unit="chunk", disable=None):
        texts = [d.text for d in docs[i : i + _ENCODE_CHUNK]]
        for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            parts.append(np.asarray([eot], dtype=np.int64))  # EOT after every document
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _samples(tokens: np.ndarray, seq_len: int, dtype: str) -> np.ndarray:
    n = len(tokens) // (seq_len + 1)  # the remainder is dropped: samples never overlap
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(dtype)


def _tokenizer(out_dir: Path, given: bytes | None, train_docs: Sequence[Document], vocab_size: int) -> Tokenizer:
    path = out_dir / TOKENIZER_NAME
    if given is None:
        return train_bpe(train_docs, vocab_size, path)
    atomic_write(path, given)
    tok = load_tokenizer(path)
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer {path} has {tok.get_vocab_size()} tokens, more than vocab_size "
                        f"{vocab_size}")
    return tok


def _load_docs(corpus: str, cache_dir: Path) -> list[Document]:
    if corpus == "builtin":
        return builtin_documents(cache_dir)
    return user_documents(Path(corpus).expanduser())


def _split_tokens(tok: Tokenizer, train_docs: list[Document], val_docs: list[Document], eot: int,
                  val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    train = _encode(tok, train_docs, eot, "train")
    if val_docs:
        return train, _encode(tok, val_docs, eot, "val")
    # A single document cannot be held out whole: its tail becomes validation.
    cut = int(len(train) * (1.0 - val_fraction))
    return train[:cut], train[cut:]


def _write_split(m: Manifest, out_dir: Path, split: str, tokens: np.ndarray, keys: list[str]) -> SplitInfo:
    if tokens.size and int(tokens.max()) >= m.vocab_size:  # would wrap silently in a uint16 shard
        raise DataError(f"token id {int(tokens.max())} >= vocab_size {m.vocab_size} for {out_dir}")
    samples = _samples(tokens, m.seq_len, m.dtype)
    if len(samples) == 0:
        raise DataError(f"{m.source} gives no {split} sample of {m.seq_len + 1} tokens ({len(tokens)} tokens) "
                        f"for {out_dir}: use more text or a shorter seq_len")
    log.info("writing %d %s samples to %s", len(samples), split, out_dir)
    return SplitInfo(write_shards(samples, out_dir, split, m.samples_per_shard), len(samples), keys)


def prepare(corpus: str, out_dir: Path, vocab_size: int, seq_len: int, *, tokenizer: Path | None = None,
            samples_per_shard: int = 2048, val_fraction: float = 0.05, cache_dir: Path | None = None,
            max_bytes: int | None = None) -> Manifest:
    """Build (or reuse) a shards dir for `corpus` ("builtin" or a path); return its manifest.

    Documents are split into train/val by key, so every document (and, for the built-in
    bibles, both translations of a book) lands wholly on one side.
    """
    if seq_len < 1 or samples_per_shard < 1:
        raise DataError(f"seq_len and samples_per_shard must be >= 1 for {out_dir}")
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    docs = truncate(order_documents(_load_docs(corpus, cache_dir)), max_bytes)
    if not docs:
        raise DataError(f"corpus {corpus} is empty after max_bytes={max_bytes}")
    held_out = val_keys([d.key for d in docs], val_fraction)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise DataError(f"tokenizer file {tokenizer} does not exist")
    # Read before clearing out_dir: the given tokenizer may be out_dir/tokenizer.json itself.
    given = Path(tokenizer).read_bytes() if tokenizer is not None else None
    m = Manifest(version=MANIFEST_VERSION, seq_len=seq_len, vocab_size=vocab_size, tokenizer_sha256="",
                 eot_id=-1, dtype=token_dtype(vocab_size), train=SplitInfo([], 0), val=SplitInfo([], 0),
                 source=_source(corpus), corpus_sha256=_corpus_sha256(docs), val_fraction=val_fraction,
                 max_bytes=max_bytes, samples_per_shard=samples_per_shard, tokenizer_trained=given is None,
                 text_bytes=sum(len(d.text.encode("utf-8")) for d in docs))
    if (have := _reusable(out_dir, m, hashlib.sha256(given).hexdigest() if given else None)) is not None:
        log.info("reusing prepared shards in %s", out_dir)
        return have

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    train_docs = [d for d in docs if d.key not in held_out]
    val_docs = [d for d in docs if d.key in held_out]
    tok = _tokenizer(out_dir, given, train_docs, vocab_size)
    m.tokenizer_sha256, m.eot_id = file_sha256(out_dir / TOKENIZER_NAME), eot_id(tok)
    train, val = _split_tokens(tok, train_docs, val_docs, m.eot_id, val_fraction)
    m.train = _write_split(m, out_dir, "train", train, [d.key for d in train_docs])
    m.val = _write_split(m, out_dir, "val", val, [d.key for d in val_docs or docs])
    save_manifest(m, out_dir)
    log.info("prepared %s: %d train / %d val samples of %d tokens", out_dir, m.train.samples, m.val.samples,
             seq_len + 1)
    return m
