"""Fixtures for launcher tests: a small prepared shard directory (real webdataset shards, real BPE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corpora import english_ish


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline import prepare

    corpus = tmp_path_factory.mktemp("launcher-corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(english_ish(rng, 1500))
    out = tmp_path_factory.mktemp("launcher-shards")
    prepare(str(corpus), out, vocab_size=512, seq_len=32, samples_per_shard=64, val_fraction=0.2)
    return out
