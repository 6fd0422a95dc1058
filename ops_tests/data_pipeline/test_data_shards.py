"""webdataset shards: exact round trip, reproducible bytes, damage reported by name."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import DataError, read_shard, token_dtype, write_shard, write_shards


@pytest.mark.parametrize("vocab", [300, 65536, 100_000])
def test_round_trip_token_exact(tmp_path, vocab):
    dtype = token_dtype(vocab)
    assert dtype == ("uint16" if vocab <= 65536 else "int32")
    rng = np.random.default_rng(vocab)
    samples = rng.integers(0, vocab, size=(77, 17)).astype(dtype)
    samples[0, :] = vocab - 1  # the largest id must survive the dtype
    infos = write_shards(samples, tmp_path, "train", 32)
    assert [i.name for i in infos] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert [i.samples for i in infos] == [32, 32, 13]
    back = np.concatenate([read_shard(tmp_path / i.name, 16, dtype, expected=i.samples) for i in infos])
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, samples)


def test_shard_bytes_depend_only_on_tokens(tmp_path):
    samples = np.arange(40 * 9, dtype=np.uint16).reshape(40, 9)
    a = write_shard(tmp_path / "a.tar", samples)
    b = write_shard(tmp_path / "b.tar", samples)
    c = write_shard(tmp_path / "c.tar", samples[::-1].copy())
    assert a.sha256 == b.sha256 != c.sha256


@pytest.fixture
def shard(tmp_path):
    samples = np.random.default_rng(1).integers(0, 60000, size=(50, 129)).astype(np.uint16)
    write_shard(tmp_path / "train-00003.tar", samples)
    return tmp_path / "train-00003.tar"


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.9])
def test_truncated_shard_names_the_file(shard, keep):
    data = shard.read_bytes()
    members_end = 50 * 1024  # 50 samples of one 512-byte header + one 512-byte data block
    cut = int(members_end * keep)
    for cut in (cut, cut // 512 * 512, cut // 1024 * 1024):  # mid-block, at a block edge, at a sample edge
        shard.write_bytes(data[:cut])
        with pytest.raises(DataError, match="train-00003.tar"):
            read_shard(shard, 128, "uint16")


def test_garbage_and_wrong_layout_name_the_file(shard):
    with pytest.raises(DataError, match="train-00003.tar"):
        read_shard(shard, 64, "uint16")  # wrong sample size
    with pytest.raises(DataError, match="train-00003.tar"):
        read_shard(shard, 128, "uint16", expected=51)  # manifest disagrees
    shard.write_bytes(b"\x00" * 100 + b"not a tar" * 1000)
    with pytest.raises(DataError, match="train-00003.tar"):
        read_shard(shard, 128, "uint16")
    with pytest.raises(DataError, match="nope.tar"):
        read_shard(shard.with_name("nope.tar"), 128, "uint16")
