"""manifest.json: what a shards dir holds. Written last by prepare, so its presence means complete."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kernels.fileio import atomic_write

from .errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
PREPARE_HINT = "run `launcher data prepare`"


@dataclass
class ShardInfo:
    name: str  # file name relative to the shards dir
    samples: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo]
    samples: int
    keys: list[str] = field(default_factory=list)  # document keys, in the order their tokens were laid out


@dataclass
class Manifest:
    version: int
    seq_len: int  # each sample holds seq_len + 1 tokens (inputs and shifted targets)
    vocab_size: int
    tokenizer_sha256: str
    eot_id: int
    dtype: str  # numpy dtype name of the stored tokens, little-endian
    train: SplitInfo
    val: SplitInfo
    source: str  # "builtin" or the resolved corpus path
    # What else decided the contents; prepare reuses a dir only when all of it matches.
    corpus_sha256: str = ""
    val_fraction: float = 0.0
    max_bytes: int | None = None
    samples_per_shard: int = 0
    text_bytes: int = 0
    tokenizer_trained: bool = True  # False: a given tokenizer.json was copied in


def save_manifest(m: Manifest, dir: Path) -> Path:
    path = Path(dir) / MANIFEST_NAME
    atomic_write(path, json.dumps(asdict(m), indent=1) + "\n")
    return path


def _split(d: dict) -> SplitInfo:
    return SplitInfo(**{**d, "shards": [ShardInfo(**s) for s in d["shards"]]})


def load_manifest(dir: Path) -> Manifest:
    path = Path(dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"no {MANIFEST_NAME} in {dir}: {PREPARE_HINT} (or point data.shards at a prepared dir)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(Manifest)}
        m = Manifest(**{k: v for k, v in d.items() if k in known})
        m.train, m.val = _split(d["train"]), _split(d["val"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"invalid {path}: {e!r}; {PREPARE_HINT} again") from e
    if m.version != MANIFEST_VERSION:
        raise DataError(f"{path} has version {m.version}, expected {MANIFEST_VERSION}: {PREPARE_HINT} again")
    return m
