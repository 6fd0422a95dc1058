"""TokenStream: every sample of an epoch exactly once across ranks and workers, deterministic,
and resumable exactly, on the same or another dp size."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_pipeline import DataError, TokenStream, make_loader, val_batches
from data_pipeline.order import EpochOrder

COUNTS = [64, 40, 64, 64, 37, 64]  # uneven, so shard boundaries fall mid-batch
TOTAL = sum(COUNTS)  # 333
G, MB = 16, 2
EPOCH = TOTAL // G * G  # 320: the last 13 samples of each epoch are dropped
VAL_ID0 = 30000


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_id_shards):
    out = tmp_path_factory.mktemp("idshards")
    write_id_shards(out, COUNTS, seq_len=8, val=37, val_id0=VAL_ID0)
    return out


def stream(shards, rank=0, dp=1, seed=7, **kw):
    kw.setdefault("shuffle_block", 2)
    return TokenStream(shards, seed=seed, global_batch=G, micro_batch=MB, dp_rank=rank, dp_size=dp, **kw)


def rank_ids(s: TokenStream, steps: int, workers: int) -> np.ndarray:
    """[steps, G/dp] sample ids one rank yields, checking each row's content is its id."""
    n = steps * s.micro_batches_per_step
    out = []
    for tokens, ids in itertools.islice(make_loader(s, workers, with_ids=True), n):
        assert tokens.dtype == torch.int64 and tokens.shape == (MB, 9)
        assert torch.equal(tokens, ids[:, None].expand(-1, 9))  # the row read is the row named
        out.append(ids.numpy())
    return np.concatenate(out).reshape(steps, -1)


def job_ids(shards, steps: int, dp: int, workers: int = 0, state=None, **kw) -> np.ndarray:
    """[steps, G] ids the whole job sees: each step is the concatenation of its ranks' blocks."""
    ranks = []
    for r in range(dp):
        s = stream(shards, r, dp, **kw)
        if state is not None:
            s.load_state_dict(state)
        ranks.append(rank_ids(s, steps, workers))
    return np.concatenate(ranks, axis=1)


@pytest.mark.parametrize("block", [1, 2, 4, 100])
def test_epoch_order_is_a_permutation(block):
    ids = EpochOrder(COUNTS, seed=3, epoch=0, block=block).global_ids(np.arange(TOTAL))
    np.testing.assert_array_equal(np.sort(ids), np.arange(TOTAL))
    assert not np.array_equal(ids, np.arange(TOTAL))
    # The shard order itself depends on the seed, not only the order inside blocks.
    first_shards = {tuple(EpochOrder(COUNTS, seed, 0, block).shard_order) for seed in range(6)}
    assert len(first_shards) > 1
    # ...and so does the order inside a shard, which also changes every epoch.
    one = [EpochOrder([50], seed, epoch, block).global_ids(np.arange(50)).tolist() for seed, epoch in
           [(0, 0), (0, 1), (1, 0)]]
    assert one[0] != one[1] and one[0] != one[2]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_one_epoch_covers_every_sample_once(shards, dp, workers):
    s = stream(shards, 0, dp)
    seen = job_ids(shards, s.steps_per_epoch, dp, workers)
    np.testing.assert_array_equal(seen, s.samples_for_steps(s.steps_per_epoch))  # same global order for any dp
    flat = seen.reshape(-1)
    assert len(flat) == EPOCH and len(set(flat.tolist())) == EPOCH  # disjoint across ranks and steps
    assert set(flat.tolist()) <= set(range(TOTAL))


def test_order_depends_on_seed_and_epoch_only(shards):
    a = stream(shards, seed=7).samples_for_steps(2 * EPOCH // G)
    np.testing.assert_array_equal(a, stream(shards, seed=7, num_workers=2).samples_for_steps(2 * EPOCH // G))
    assert not np.array_equal(a, stream(shards, seed=8).samples_for_steps(2 * EPOCH // G))
    first, second = a[: EPOCH // G].reshape(-1), a[EPOCH // G :].reshape(-1)
    assert not np.array_equal(first, second)  # each epoch is reshuffled
    # Samples mix across shards within a block instead of coming one shard at a time.
    shard_of = np.searchsorted(np.cumsum(COUNTS), a[0], side="right")
    assert len(set(shard_of.tolist())) > 1


@pytest.mark.parametrize(("k", "dp_before", "dp_after", "workers"),
                         [(3, 2, 4, 0), (7, 2, 1, 2), (17, 4, 2, 0), (23, 2, 4, 2), (0, 1, 2, 2)])
def test_resume_continues_exactly(shards, k, dp_before, dp_after, workers):
    later = 8
    full = stream(shards).samples_for_steps(k + later)  # the uninterrupted run; an epoch is 20 steps
    trainers = [stream(shards, r, dp_before) for r in range(dp_before)]
    iters = [iter(make_loader(t, workers, with_ids=True)) for t in trainers]
    for _ in range(k):  # train k steps; loader workers read ahead of the position
        for t, it in zip(trainers, iters):
            for _ in range(t.micro_batches_per_step):
                next(it)
            t.advance_step()
    state = trainers[0].state_dict()
    assert all(t.state_dict() == state for t in trainers)
    assert state["epoch"] * EPOCH + state["position"] == k * G
    resumed = job_ids(shards, later, dp_after, workers, state=state)
    np.testing.assert_array_equal(resumed, full[k:])


def test_bad_settings_and_states_raise(shards, tmp_path, write_id_shards):
    with pytest.raises(DataError, match="multiple"):
        TokenStream(shards, seed=0, global_batch=12, micro_batch=2, dp_rank=0, dp_size=4)
    with pytest.raises(DataError, match="global batch"):
        TokenStream(shards, seed=0, global_batch=512, micro_batch=2, dp_rank=0, dp_size=1)
    s = stream(shards)
    bad = {**s.state_dict(), "global_batch": 32}
    with pytest.raises(DataError, match="does not match"):
        s.load_state_dict(bad)
    with pytest.raises(DataError, match="step boundary"):
        s.load_state_dict({**s.state_dict(), "position": 5})
    write_id_shards(tmp_path / "other", COUNTS[::-1])  # same sample count, other shards
    with pytest.raises(DataError, match="does not match"):
        stream(tmp_path / "other").load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="launcher data prepare"):
        TokenStream(tmp_path, seed=0, global_batch=G, micro_batch=MB, dp_rank=0, dp_size=1)


def test_missing_and_corrupt_shards_are_named(tmp_path, write_id_shards):
    write_id_shards(tmp_path, COUNTS)
    (tmp_path / "train-00002.tar").unlink()
    with pytest.raises(DataError, match=r"train-00002\.tar.*launcher data prepare"):
        stream(tmp_path)
    write_id_shards(tmp_path, COUNTS)
    path = tmp_path / "train-00004.tar"
    data = bytearray(path.read_bytes())
    data[512 + 3] ^= 1  # one flipped token bit: still a valid tar, caught by the checksum
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00004\.tar"):
        for _ in itertools.islice(stream(tmp_path).micro_batches(), EPOCH // MB):  # reads every shard
            pass


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_val_batches_split_disjointly(shards, dp):
    got = [[(t, i) for t, i in val_batches(shards, micro_batch=3, dp_rank=r, dp_size=dp, max_samples=30,
                                           with_ids=True)] for r in range(dp)]
    per_rank = 30 // (dp * 3) * 3
    assert all(len(g) == per_rank // 3 for g in got)  # every rank runs the same number of batches
    ids = np.concatenate([i.numpy() for g in got for _, i in g])
    np.testing.assert_array_equal(ids, np.arange(dp * per_rank))  # the first val samples, in order
    tokens = torch.cat([t for g in got for t, _ in g])
    assert torch.equal(tokens[:, 0], torch.from_numpy(ids) + VAL_ID0)
    with pytest.raises(DataError, match="val samples"):
        val_batches(shards, micro_batch=8, dp_rank=0, dp_size=8, max_samples=30)


def test_iterating_the_stream_uses_its_workers_and_position(shards):
    s = stream(shards, 1, 2, num_workers=2)
    s.advance_step(5)
    n = 3 * s.micro_batches_per_step
    plain = list(itertools.islice(stream(shards, 1, 2).micro_batches(s.state_dict()), n))
    via_workers = list(itertools.islice(iter(s), n))
    assert all(torch.equal(a, b) for a, b in zip(plain, via_workers, strict=True))
