"""prepare(): documents -> BPE -> train/val samples -> shards + manifest, checked token-exact."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data_pipeline import (EOT, DataError, default_shards_dir, file_sha256, load_manifest, load_tokenizer,
                           prepare, read_shard, train_bpe, user_documents)

VOCAB, SEQ = 300, 16


@pytest.fixture(scope="module")
def prepared(text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    m = prepare(str(text_corpus), out, VOCAB, SEQ, samples_per_shard=32, val_fraction=0.2)
    return out, m


def _rows(out, m, split):
    return [read_shard(out / s.name, SEQ, m.dtype, expected=s.samples) for s in split.shards]


def test_manifest_matches_shards(prepared):
    out, m = prepared
    assert load_manifest(out) == m
    assert m.dtype == "uint16" and m.seq_len == SEQ and m.vocab_size == VOCAB
    assert m.tokenizer_sha256 == file_sha256(out / "tokenizer.json")
    for split in (m.train, m.val):
        assert len(split.shards) >= 1
        rows = _rows(out, m, split)
        assert [len(r) for r in rows] == [s.samples for s in split.shards]
        assert sum(len(r) for r in rows) == split.samples
        assert all(file_sha256(out / s.name) == s.sha256 for s in split.shards)
    assert len(m.train.shards) >= 2  # the corpus is sized to need several shards


def test_samples_are_the_encoded_documents(prepared, text_corpus):
    out, m = prepared
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.token_to_id(EOT) == m.eot_id
    text = {d.key: d.text for d in user_documents(text_corpus)}
    for split in (m.train, m.val):
        got = np.concatenate(_rows(out, m, split)).reshape(-1)
        assert len(got) == split.samples * (SEQ + 1)
        want = np.concatenate([tok.encode(text[k]).ids + [m.eot_id] for k in split.keys])
        assert len(want) - len(got) < SEQ + 1  # only the last partial sample is dropped
        np.testing.assert_array_equal(got, want[: len(got)])
        decoded = tok.decode(got.tolist(), skip_special_tokens=False)
        assert "".join(text[k] + EOT for k in split.keys).startswith(decoded)
        assert len(decoded) > 0.9 * sum(len(text[k]) for k in split.keys)


def test_split_is_by_whole_document(prepared, text_corpus):
    _, m = prepared
    keys = {d.key for d in user_documents(text_corpus)}
    assert len(keys) == 12 and "sub/doc0.txt" in keys and "more.jsonl:4" in keys
    train, val = set(m.train.keys), set(m.val.keys)
    assert train.isdisjoint(val) and train | val == keys
    assert len(val) == math.ceil(0.2 * len(keys))


def test_prepare_reuses_identical_and_redoes_changed(prepared, text_corpus, tmp_path):
    out, m = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(str(text_corpus), out, VOCAB, SEQ, samples_per_shard=32, val_fraction=0.2) == m
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # A given tokenizer is used as is, and the split/encoding is the same as with the trained one.
    other = tmp_path / "other"
    m2 = prepare(str(text_corpus), other, VOCAB, SEQ, samples_per_shard=64, val_fraction=0.2,
                 tokenizer=out / "tokenizer.json")
    assert not m2.tokenizer_trained and m2.tokenizer_sha256 == m.tokenizer_sha256
    assert m2.train.samples == m.train.samples and len(m2.train.shards) < len(m.train.shards)
    # Changed parameters in the same dir rebuild it and leave no stale shards behind.
    m3 = prepare(str(text_corpus), other, VOCAB, 8, samples_per_shard=64, val_fraction=0.2)
    assert m3.seq_len == 8 and m3.train.samples > m2.train.samples
    tars = sorted(p.name for p in other.glob("*.tar"))
    assert tars == sorted(s.name for s in m3.train.shards + m3.val.shards)


def test_tokenizer_is_deterministic(text_corpus, tmp_path):
    docs = user_documents(text_corpus)
    train_bpe(docs, VOCAB, tmp_path / "a.json")
    train_bpe(docs, VOCAB, tmp_path / "b.json")
    assert file_sha256(tmp_path / "a.json") == file_sha256(tmp_path / "b.json")


def test_single_document_is_split_by_tokens(text_corpus, tmp_path):
    m = prepare(str(text_corpus / "doc7.txt"), tmp_path / "one", VOCAB, SEQ, val_fraction=0.25)
    assert m.train.keys == m.val.keys == ["doc7.txt"]
    assert m.val.samples > 0 and 2 < m.train.samples / m.val.samples < 4


def test_max_bytes_caps_the_corpus(text_corpus, tmp_path):
    m = prepare(str(text_corpus), tmp_path / "cap", VOCAB, SEQ, max_bytes=6000, val_fraction=0.3)
    assert m.text_bytes == 6000 and m.max_bytes == 6000


def test_bad_inputs_raise_one_line_data_errors(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(DataError, match="no-such-corpus") as e:
        prepare(str(missing), tmp_path / "out", VOCAB, SEQ)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        user_documents(tmp_path / "empty")
    with pytest.raises(DataError, match="launcher data prepare") as e:
        load_manifest(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2"):
        user_documents(tmp_path / "bad")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="launcher data prepare"):
        load_manifest(tmp_path / "empty")


def test_default_shards_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert default_shards_dir("builtin", 8192, 128) == tmp_path / "shards" / "builtin-v8192-t128"
    a = default_shards_dir(str(tmp_path / "x" / "corpus"), 300, 16)
    b = default_shards_dir(str(tmp_path / "y" / "corpus"), 300, 16)
    assert a != b and a.parent == tmp_path / "shards"
    assert a.name.startswith("corpus-") and a.name.endswith("-v300-t16")
    assert default_shards_dir("builtin", 1, 2, cache_dir=tmp_path / "c") == tmp_path / "c/shards/builtin-v1-t2"
