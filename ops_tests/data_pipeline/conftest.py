"""Fixtures for the data pipeline tests: small corpora and shard dirs made in tmp dirs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import Manifest, SplitInfo, save_manifest, write_shard, write_shards
from data_pipeline.shards import shard_name

from corpora import english_ish


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 .txt documents (one nested), a .jsonl with 4 documents, and a file that must be ignored."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i in range(8):
        where = root / "sub" if i % 3 == 0 else root
        (where / f"doc{i}.txt").write_text(english_ish(rng, 300 + 40 * i))
    with open(root / "more.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"text": english_ish(rng, 250), "meta": 1}) + "\n")
        f.write("\n")  # blank lines are allowed
    (root / "README.md").write_text("not part of the corpus\n")
    return root


def _write_id_shards(out: Path, counts: list[int], seq_len: int = 8, val: int = 0,
                     val_id0: int = 30000) -> Manifest:
    """Train shards whose sample with global id g holds the tokens [g, g, ...]: content reveals identity.
    Val sample i holds val_id0 + i."""
    out.mkdir(parents=True, exist_ok=True)

    def rows(first: int, n: int) -> np.ndarray:
        return np.repeat(np.arange(first, first + n, dtype=np.uint16)[:, None], seq_len + 1, axis=1)

    offsets = np.concatenate([[0], np.cumsum(counts)])
    train = [write_shard(out / shard_name("train", i), rows(int(offsets[i]), n)) for i, n in enumerate(counts)]
    val_shards = write_shards(rows(val_id0, val), out, "val", 10) if val else []
    m = Manifest(version=1, seq_len=seq_len, vocab_size=65536, tokenizer_sha256="0" * 64, eot_id=0,
                 dtype="uint16", train=SplitInfo(train, int(offsets[-1])), val=SplitInfo(val_shards, val),
                 source="synthetic")
    save_manifest(m, out)
    return m


@pytest.fixture(scope="session")
def write_id_shards():
    """A fixture, not an import: test dirs without __init__.py cannot share a conftest module safely."""
    return _write_id_shards
