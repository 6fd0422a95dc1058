"""Model parallelism through the real CLI: a tiny RMT job with `parallel: {tp: 2}` trains on 2 CPU workers
(local Ray, DeepSpeed over gloo, MLflow), `launcher eval` of its export reproduces the logged val loss, and
`launcher resume --set parallel.*` continues it on another layout (dp2) from the consolidated export
(resharding). The RMT runs here as the newest entrant through the registry alone (its residual matrix,
vocab-split position table and z-loss under TP). Pipeline stages are resharded on real engines in
`ops_tests/parallel/test_reshard.py` (tp2×pp2 ↔ dp2) and every layout runs in the layout harness."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from test_launcher_e2e import LOCAL, launcher, status

pytestmark = pytest.mark.slow
SPLIT, STEPS = 16, 24
EVAL_SAMPLES = 64


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_tp2_job_trains_and_resumes_resharded(tmp_path):
    home = tmp_path
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "rmt", "preset": "tiny"}
    spec["optim"] = {**spec["optim"], "lr": 1e-2}  # the RMT repository's own lr: its µP init starts slower at 3e-3
    spec["parallel"] = {**spec.get("parallel", {}), "tp": 2}
    spec["train"] = {**spec["train"], "steps": SPLIT, "eval_every": 8, "checkpoint_every": 8,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}  # the same samples `launcher eval` reads below
    config = home / "tp2.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "mp", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mp", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == SPLIT and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(SPLIT))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses[:3], vals)
    # The export gathers TP shards into whole tensors: one process evaluates it to
    # the val_loss the 4 ranks logged (the same validation samples).
    r = launcher("eval", "mp", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)
    _export_weights_only(home, "mp")

    # Reshard: the tp2 checkpoint resumes as plain data parallelism on 2 workers.
    r = launcher("resume", "mp", "--set", "parallel.tp=1", "--set", "cluster.workers=2",
                 "--set", f"train.steps={STEPS}", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mp", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == STEPS and len(st["workers"]) == 2, st
    rank0 = (home / "runs" / "mp" / "logs" / "rank0.log").read_text()
    assert "written with tp=2 pp=1 dp=1; loading its consolidated state into tp=1 pp=1 dp=2" in rank0
    losses = dict(_history(uri, run_id, "loss"))
    assert sorted(losses) == list(range(STEPS))
    # the resumed run continues where the checkpoint left off, not from a fresh model
    first_resumed = losses[SPLIT]
    assert first_resumed < losses[0] - 1.0, losses
    assert re.search(r"val_loss at step \d+", r.stdout), r.stdout


def test_memoryformer_tp2_job_trains_and_eval_reproduces_its_val_loss(tmp_path):
    """MemoryFormer's tables split by columns over 2 CPU workers through the real CLI, with the tables' own
    optimizer group (lr × 3, no decay); the consolidated export evaluates in one process to the logged val loss."""
    home, steps = tmp_path, 8
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "memoryformer", "preset": "tiny"}
    spec["optim"] = {**spec["optim"], "lr": 1e-2, "warmup_steps": 2, "table_lr_multiplier": 3.0,
                     "table_weight_decay": 0.0}
    spec["parallel"] = {**spec.get("parallel", {}), "tp": 2}
    spec["train"] = {**spec["train"], "steps": steps, "eval_every": steps, "checkpoint_every": steps,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}
    config = home / "mf.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "mf", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mf", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == steps and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(steps))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses, vals)
    r = launcher("eval", "mf", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)


def _export_weights_only(home, name: str) -> None:  # noqa: ANN001
    """An arch with no transformers class: `--format hf` is refused with the reason (nothing written);
    `--format safetensors` writes exactly the checkpoint's weights under our names, and our config."""
    from safetensors.torch import load_file

    from parallel import consolidated

    r = launcher("export", name, "--format", "hf", "--out", str(home / "hf"), home=home)
    assert r.returncode != 0 and not (home / "hf").exists()
    assert "model arch 'rmt' has no transformers class" in r.stderr and "allowed for it: --format safetensors" in r.stderr
    r = launcher("export", name, "--format", "safetensors", "--out", str(home / "st"), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout)
    weights = load_file(str(home / "st" / "model.safetensors"))
    tensors, _ = consolidated.read(Path(info["checkpoint"]) / "consolidated")
    params = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    assert weights.keys() == params.keys() and all(torch.equal(weights[k], params[k]) for k in params)
    ours = json.loads((home / "st" / "lmforge_config.json").read_text())
    assert ours["arch"] == "rmt" and ours["step"] == info["step"] and ours["config"]["d_key"] == 16
