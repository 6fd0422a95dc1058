"""`launcher eval --tasks` (issue 19): BLiMP scoring equals a hand computation (every token's log-probability,
the first after the end-of-text token, summed), bad BLiMP directories are named, the position buckets of
`ppl` add up to its loss. The CLI path (MLflow metrics at the checkpoint's step) is in test_launcher_e2e.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import models
from data_pipeline import load_manifest
from data_pipeline.tokenizer import EOT, load_tokenizer
from launcher.errors import UserError
from launcher.eval_tasks import blimp, parse_tasks, position_buckets, ppl, sentence_logprobs

PAIRS = {"agreement": [("The dogs bark.", "The dogs barks."), ("A cat sleeps.", "A cat sleep.")],
         "islands": [("Who did you see?", "Who you did see?"), ("What was sold?", "What sold was?"),
                     ("Where is it?", "Where it is?")]}


def _loaded(shards) -> SimpleNamespace:  # noqa: ANN001
    manifest = load_manifest(shards)
    cfg = models.make_config("transformer", "tiny", d_model=32, n_layers=2, n_heads=2, vocab_size=manifest.vocab_size,
                             max_seq_len=manifest.seq_len)
    model = models.build(cfg, seed=0).double().eval()  # float64: padding and batching change no digit that matters
    with torch.no_grad():
        model.output.weight.mul_(20)  # opinions strong enough that pairs differ
    return SimpleNamespace(model=model, shards=shards, manifest=manifest,
                           spec=SimpleNamespace(data=SimpleNamespace(micro_batch=4)))


def _write_blimp(directory, pairs=PAIRS) -> None:  # noqa: ANN001
    directory.mkdir()
    for name, rows in pairs.items():
        (directory / f"{name}.jsonl").write_text("".join(
            json.dumps({"sentence_good": g, "sentence_bad": b, "UID": name, "pairID": str(i)}) + "\n"
            for i, (g, b) in enumerate(rows)))


def _by_hand(model, ids: list[int], bos: int) -> float:  # noqa: ANN001
    """One full forward per token: log p(t_i | bos, t_<i), summed."""
    total = 0.0
    with torch.no_grad():
        for i, t in enumerate(ids):
            prefix = torch.tensor([[bos, *ids[:i]]])
            total += torch.log_softmax(model(prefix)[0, -1].double(), -1)[t].item()
    return total


def test_blimp_scores_equal_a_hand_computation(small_shards, tmp_path):
    loaded = _loaded(small_shards)
    tok = load_tokenizer(small_shards / "tokenizer.json")
    bos = tok.token_to_id(EOT)
    seqs = [tok.encode(s).ids for rows in PAIRS.values() for pair in rows for s in pair]
    got = sentence_logprobs(loaded.model, seqs, bos, batch=3)  # batches of mixed lengths, padded
    for ids, score in zip(seqs, got):
        assert score == pytest.approx(_by_hand(loaded.model, ids, bos), abs=1e-9)
    _write_blimp(tmp_path / "blimp")
    result = blimp(loaded, blimp_dir=str(tmp_path / "blimp"))
    right = {name: sum(_by_hand(loaded.model, tok.encode(g).ids, bos) > _by_hand(loaded.model, tok.encode(b).ids, bos)
                       for g, b in rows) for name, rows in PAIRS.items()}
    assert result["acc/agreement"] == right["agreement"] / 2 and result["acc/islands"] == right["islands"] / 3
    assert result["accuracy"] == sum(right.values()) / 5 and result["pairs"] == 5
    assert blimp(loaded, blimp_dir=str(tmp_path / "blimp"), blimp_pairs=1)["pairs"] == 2


def test_bad_blimp_directories_are_named(small_shards, tmp_path):
    loaded = _loaded(small_shards)
    with pytest.raises(UserError, match="needs --blimp-dir"):
        blimp(loaded)
    with pytest.raises(UserError, match=f"{tmp_path / 'none'}: not a directory"):
        blimp(loaded, blimp_dir=str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no <paradigm>.jsonl files"):
        blimp(loaded, blimp_dir=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text(json.dumps({"sentence_good": "a"}) + "\n")
    with pytest.raises(UserError, match="x.jsonl line 1 has no sentence_bad"):
        blimp(loaded, blimp_dir=str(tmp_path / "bad"))


def test_ppl_buckets_cover_every_position_and_average_to_the_loss(small_shards):
    loaded = _loaded(small_shards)
    out = ppl(loaded, samples=16)
    buckets = position_buckets(loaded.manifest.seq_len)
    assert buckets[0] == (0, 1) and buckets[-1][1] == loaded.manifest.seq_len
    assert all(a < b for a, b in buckets) and all(b == c for (_, b), (c, _) in zip(buckets, buckets[1:]))
    weighted = sum(out[f"loss_pos_{a}_{b}"] * (b - a) for a, b in buckets) / loaded.manifest.seq_len
    assert weighted == pytest.approx(out["val_loss"], rel=1e-9) and out["samples"] == 16


def test_unknown_tasks_list_the_known():
    assert parse_tasks("ppl, blimp") == ["ppl", "blimp"]
    with pytest.raises(UserError, match="unknown task lambada; known: ppl, blimp"):
        parse_tasks("ppl,lambada")
