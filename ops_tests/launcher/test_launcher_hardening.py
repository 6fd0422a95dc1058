"""Hostile or careless input through the real CLI, refused before any worker starts, with one line:
checkpoints that would run code, job names that leave their directory, impossible specs, damaged shards,
an unreachable tracking server, and two drivers for one job. None of these starts Ray."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from payloads import plant_payload
from spawn_ranks import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"


@pytest.fixture()
def cli(capsys, monkeypatch, tmp_path):
    """`launcher ...` in this process (the real entry point); returns (exit code, stderr lines)."""
    from launcher import cli as launcher_cli

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    root = logging.getLogger()
    before = list(root.handlers)

    def run(*args: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            rc = launcher_cli.main(list(args))
        finally:
            for h in [h for h in root.handlers if h not in before]:
                root.removeHandler(h)
                h.close()
        return rc, capsys.readouterr().err.strip().splitlines()

    return run


def _sets(tmp_path: Path, shards: Path, **extra) -> list[str]:
    values = {"train.output_dir": tmp_path / "runs", "data.shards": shards, "data.corpus": None,
              "data.seq_len": 32, "data.vocab_size": 512, **extra}
    return [a for k, v in values.items() for a in ("--set", f"{k}={'null' if v is None else v}")]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- checkpoints that would run code -------------------------------------------------------------------

def _write_checkpoint(rank: int, world: int, spec_path: str, ckpt_root: str) -> None:
    """A real one-rank DeepSpeed checkpoint of the spec's model, as a job of that spec writes it."""
    import models
    from launcher.spec import load_spec
    from launcher.validate import model_config
    from parallel import checkpoint
    from parallel.engine import EngineConfig, build_engine

    spec = load_spec(spec_path)
    engine = build_engine(models.build(model_config(spec, vocab_size=512), seed=0),
                          EngineConfig(micro_batch=2, grad_accum=1, dp=1, zero=1, lr=1e-3, warmup_steps=1, total_steps=2))
    checkpoint.save(engine, Path(ckpt_root), 2, {"step": 2, "data": {}}, {"world": 1, "dp": 1}, keep=2)


@pytest.fixture(scope="module")
def honest_job(tmp_path_factory, small_shards) -> Path:
    from launcher.spec import dump_spec, load_spec

    job = tmp_path_factory.mktemp("runs") / "honest"
    (job / "checkpoints").mkdir(parents=True)
    overrides = [f"data.shards={small_shards}", "data.corpus=null", "data.seq_len=32", "data.vocab_size=512",
                 f"train.output_dir={job.parent}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2"]
    dump_spec(load_spec(LOCAL, overrides), job / "spec.yaml")
    spawn_ranks(_write_checkpoint, 1, str(job / "spec.yaml"), str(job / "checkpoints"))
    return job


def test_eval_and_resume_refuse_every_pickled_file_and_the_payload_never_runs(cli, honest_job, tmp_path):
    rc, _ = cli("eval", str(honest_job))
    assert rc == 0  # the honest checkpoint evaluates
    step = honest_job / "checkpoints" / "step_2"
    planted = sorted(str(p.relative_to(step)) for p in step.rglob("*.pt"))
    planted.append("consolidated/trainer_state.pt")  # the export's trainer state, as older versions wrote it
    assert {"rng_rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= \
        {Path(p).name for p in planted}
    for i, rel in enumerate(planted):
        job = tmp_path / f"job{i}"
        shutil.copytree(honest_job, job)
        ckpt = job / "checkpoints" / "step_2"
        if rel.endswith("trainer_state.pt"):
            (ckpt / "consolidated" / "trainer_state.json").unlink()
            manifest = json.loads((ckpt / "manifest.json").read_text())
            manifest["files"].pop("consolidated/trainer_state.json")
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
        marker = tmp_path / f"ran{i}"
        plant_payload(ckpt, rel, marker)
        for verb in ("eval", "resume"):
            rc, err = cli(verb, str(job))
            assert rc == 2 and len(err) == 1, (verb, rel, err)
            assert err[0].startswith("error: refusing to load") and rel in err[0] and "posix.system" in err[0], err
            assert not marker.exists(), f"{verb} ran the payload in {rel}"
        assert not (job / "workers").exists() or not any((job / "workers").iterdir())  # no rank started


# --- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "", "n" * 300, ".hidden"])
def test_bad_job_names_are_refused_before_anything_is_written(cli, tmp_path, small_shards, name):
    parent = tmp_path / "parent"
    (parent / "out").mkdir(parents=True)
    before = _files(tmp_path)
    rc, err = cli("submit", str(LOCAL), "--name", name, *_sets(tmp_path, small_shards, **{"train.output_dir": parent / "out"}))
    assert rc == 2 and len(err) == 1 and "not a valid job name" in err[0] and "A-Z a-z 0-9" in err[0], err
    assert _files(tmp_path) == before  # nothing under the output dir's parent (or anywhere else here)


def test_the_default_name_of_any_config_file_follows_the_rule():
    from launcher.jobs import NAME_RULE, default_name

    for stem in ("local", "my config", ".hidden", "___", "ü" * 5, "x" * 200):
        assert NAME_RULE.fullmatch(default_name(stem)), stem


def test_a_name_that_resolves_outside_the_output_dir_is_refused(tmp_path):
    from launcher.errors import JobError
    from launcher.jobs import job_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "evil").symlink_to(tmp_path / "elsewhere")
    assert job_dir(tmp_path / "out", "fine-name_1.0").path == (tmp_path / "out" / "fine-name_1.0").resolve()
    with pytest.raises(JobError, match="outside train.output_dir"):
        job_dir(tmp_path / "out", "evil")


# --- impossible specs -------------------------------------------------------------------------------------

def test_a_layout_beyond_this_host_is_refused_with_the_arithmetic(cli, tmp_path, small_shards):
    t0 = time.monotonic()
    rc, err = cli("submit", str(LOCAL), "--name", "big", *_sets(tmp_path, small_shards, **{
        "cluster.workers": 1000, "data.global_batch": 8000}))
    cores = os.cpu_count()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: cluster.workers: 1000 workers × 1 cpus_per_worker = 1000 CPUs"), err
    assert f"{cores} cores × cluster.oversubscribe 4 = {cores * 4}" in err[0], err
    # A model whose plan needs more memory than any host here has: refused with the per-rank sum.
    rc, err = cli("submit", str(LOCAL), "--name", "huge", *_sets(tmp_path, small_shards, **{
        "model.preset": "1.3b", "model.d_model": 16384, "cluster.workers": 4, "data.global_batch": 32}))
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: model.preset: transformer 1.3b needs"), err
    assert "GiB per rank (launcher plan) × 4 ranks" in err[0] and "GiB of RAM" in err[0], err
    rc, err = cli("submit", str(LOCAL), "--name", "long", *_sets(tmp_path, small_shards, **{"train.steps": 10**12}))
    assert rc == 2 and err == ["error: train.steps: 1000000000000 is beyond the largest value allowed (1,000,000,000)"]
    print(f"three refusals in {time.monotonic() - t0:.1f} s")
    assert not (tmp_path / "runs").exists()


# --- damaged shards and an unreachable tracking server ----------------------------------------------------

def _damaged_copy(small_shards: Path, dst: Path, how: str) -> Path:
    shutil.copytree(small_shards, dst)
    shard = sorted(dst.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x10  # one bit, inside a sample's tokens
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_shard_fails_the_job_once_naming_the_shard(cli, tmp_path, small_shards, how):
    shard = _damaged_copy(small_shards, tmp_path / "shards", how)
    t0 = time.monotonic()
    rc, err = cli("submit", str(LOCAL), "--name", "bad-data", *_sets(tmp_path, tmp_path / "shards"))
    took = time.monotonic() - t0
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: data: corrupt shard {shard}: sha256"), err
    from launcher import jobs

    status = jobs.status(jobs.find("bad-data"))  # what `launcher status --json` prints
    assert status["state"] == "FAILED" and status["restarts"] == 0 and str(shard) in status["error"]
    assert not any((tmp_path / "runs" / "bad-data" / "workers").iterdir())
    print(f"{how} shard refused in {took:.1f} s")


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: a tracking server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def test_an_unreachable_or_silent_tracking_server_is_refused_in_seconds(cli, tmp_path, small_shards):
    t0 = time.monotonic()
    rc, err = cli("submit", str(LOCAL), "--name", "nomlflow", *_sets(tmp_path, small_shards, **{
        "tracking.uri": "http://127.0.0.1:9"}))
    refused_s = time.monotonic() - t0
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: tracking.uri: no MLflow server answered at "
                                                           "http://127.0.0.1:9"), err
    silent = SilentServer()
    try:
        t0 = time.monotonic()
        rc, err = cli("submit", str(LOCAL), "--name", "hung", *_sets(tmp_path, small_shards, **{
            "tracking.uri": silent.uri, "tracking.probe_timeout_s": 1}))
        silent_s = time.monotonic() - t0
    finally:
        silent.close()
    assert rc == 2 and len(err) == 1 and "within 1 s" in err[0], err
    print(f"refused in {refused_s:.1f} s (connection refused) and {silent_s:.1f} s (silent server, 1 s probe)")


# --- one driver per job -----------------------------------------------------------------------------------

def test_two_simultaneous_submits_of_one_name_start_exactly_one_driver(tmp_path, small_shards):
    """Both processes start at once; the one that gets the job's lock holds it while it probes a tracking
    server that never answers, so the other must find the lock taken."""
    silent = SilentServer()
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "launcher.cli", "submit", str(LOCAL), "--name", "same",
           *_sets(tmp_path, small_shards, **{"tracking.uri": silent.uri, "tracking.probe_timeout_s": 120})]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        loser = None
        deadline = time.monotonic() + 120
        while loser is None and time.monotonic() < deadline:
            loser = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.1)
        assert loser is not None, "neither submit returned"
        winner = next(p for p in procs if p is not loser)
        assert winner.poll() is None, "both submits ended: the lock did not hold the second one out"
    finally:
        silent.close()  # the winner's probe now fails at once
    outs = [p.communicate(timeout=60) for p in procs]
    errs = [e for _, e in outs]
    already = [e for e in errs if "is already running" in e]
    assert len(already) == 1, errs
    assert already[0].strip() == errs[procs.index(loser)].strip()
    assert "tracking.uri" in errs[procs.index(winner)], errs
