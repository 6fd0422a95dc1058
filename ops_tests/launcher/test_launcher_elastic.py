"""Elastic resume through the real CLI: a job checkpointed on N workers resumes on M
(`launcher resume NAME --set cluster.workers=M`), and the samples it trains on, recorded by the
ranks themselves, are exactly the uninterrupted run's: none repeated, none skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_launcher_e2e import LOCAL, launcher, status

pytestmark = pytest.mark.slow
STEPS = 8
# One job resized: checkpointed on 1 worker at step 4, resumed on 2 to the end. (Shrinking, 2 -> 1, is the
# node-loss test's elastic resume: ops_tests/launcher/test_launcher_node_loss.py.)
LEGS = [(1, 4), (2, STEPS)]  # (workers, train.steps) of the submit and the resume


def _args(home: Path, steps: int, workers: int) -> list[str]:
    values = {"train.steps": steps, "train.eval_every": 0, "train.checkpoint_every": 3, "cluster.workers": workers,
              "data.record_samples": "true", "train.output_dir": home / "runs", "tracking.system_metrics": "false"}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _consumed(home: Path, name: str) -> dict[int, list[int]]:
    """step -> the global sample ids all ranks trained on at that step (rank order)."""
    per_step: dict[int, list[int]] = {}
    for f in sorted((home / "runs" / name / "workers").glob("samples_rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per_step.setdefault(rec["step"], []).extend(rec["ids"])
    return per_step


@pytest.fixture(scope="module")
def uninterrupted() -> dict[int, list[int]]:
    """step -> the global sample ids an uninterrupted run of the job trains on: the stream's own schedule from
    step 0 (`TokenStream.samples_for_steps`, no I/O), the same for any worker count (the global batch is fixed)."""
    from data_pipeline import TokenStream
    from launcher.orchestrator import resolve_shards
    from launcher.spec import load_spec

    spec = load_spec(LOCAL)
    d = spec.data
    stream = TokenStream(resolve_shards(spec), seed=spec.train.seed, global_batch=d.global_batch,
                         micro_batch=d.micro_batch, dp_rank=0, dp_size=1)
    return {step: ids.tolist() for step, ids in enumerate(stream.samples_for_steps(STEPS))}


@pytest.fixture(scope="module")
def resized(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("elastic")
    (workers, steps), *resumes = LEGS
    r = launcher("submit", str(LOCAL), "--name", "elastic", *_args(home, steps, workers), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    legs = {}
    for after, steps in resumes:
        before, workers = workers, after
        r = launcher("resume", "elastic", *_args(home, steps, after), home=home)
        assert r.returncode == 0, r.stderr[-4000:]
        legs[(before, after)] = {"steps": steps, "status": status("elastic", home)}
    return {"home": home, "legs": legs}


@pytest.mark.parametrize("before,after", [(1, 2)])
def test_resume_on_another_worker_count_consumes_exactly_the_same_samples(uninterrupted, resized, before, after):
    home, leg = resized["home"], resized["legs"][(before, after)]
    st = leg["status"]
    assert st["state"] == "SUCCEEDED" and st["step"] == leg["steps"] and len(st["workers"]) == after, st
    rank0 = (home / "runs" / "elastic" / "logs" / "rank0.log").read_text()
    assert f"written with tp=1 pp=1 dp={before}; loading its consolidated state into tp=1 pp=1 dp={after}" in rank0

    got = _consumed(home, "elastic")
    assert sorted(got) == sorted(uninterrupted) == list(range(STEPS))
    for step, ids in uninterrupted.items():
        assert sorted(got[step]) == sorted(ids), f"step {step} trained on other samples than the uninterrupted run"
    flat = [i for ids in got.values() for i in ids]
    assert len(flat) == len(set(flat)), "a sample was trained on twice"
