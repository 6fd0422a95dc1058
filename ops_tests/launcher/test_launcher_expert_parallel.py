"""Expert-parallel MoEUT through the real CLI: `model.arch: moeut` with `parallel.ep: 2` trains on 2 CPU
workers (local Ray, DeepSpeed over gloo, MLflow), each holding half of every σ-MoE layer's experts; the
export it leaves (experts gathered from both ranks) evaluates in one process to the val_loss they logged."""
from __future__ import annotations

import json

import pytest
import yaml

from test_launcher_e2e import LOCAL, launcher, status
from test_launcher_parallel import _history

pytestmark = pytest.mark.slow
STEPS = 16
EVAL_SAMPLES = 64


def test_tiny_moeut_trains_with_ep2(tmp_path):
    home = tmp_path
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "moeut", "preset": "tiny"}
    spec["parallel"] = {**spec.get("parallel", {}), "ep": 2}
    spec["train"] = {**spec["train"], "steps": STEPS, "eval_every": 8, "checkpoint_every": 8,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}  # the same samples `launcher eval` reads below
    config = home / "ep2.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "ep", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("ep", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == STEPS and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(STEPS))
    # MoE metrics: the regulariser (negative: −entropy terms) and each shared layer's expert load
    assert all(v < 0 for _, v in _history(uri, run_id, "aux_loss"))
    for i in range(2):
        entropy = _history(uri, run_id, f"moe/layer{i}/load_entropy")
        lo, hi = _history(uri, run_id, f"moe/layer{i}/load_min"), _history(uri, run_id, f"moe/layer{i}/load_max")
        assert len(entropy) == STEPS and all(0 < v <= 1 for _, v in entropy)
        assert all(a[1] <= 1 <= b[1] for a, b in zip(lo, hi))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses[:3], vals)
    # one process, all experts in one bank: the loss the two expert-parallel ranks logged
    r = launcher("eval", "ep", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)
