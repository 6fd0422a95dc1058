"""Context-parallel DeltaNet through the real CLI: `model.arch: deltanet` with `parallel.cp: 2` trains on
2 CPU workers (local Ray, DeepSpeed over gloo, MLflow), each rank holding half of every sequence; the
export it leaves evaluates in one process (no CP) to the val_loss the two ranks logged."""
from __future__ import annotations

import json

import pytest
import yaml

from test_launcher_e2e import LOCAL, launcher, status
from test_launcher_parallel import _history

pytestmark = pytest.mark.slow
STEPS = 16
EVAL_SAMPLES = 64


def test_tiny_deltanet_trains_with_cp2(tmp_path):
    home = tmp_path
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "deltanet", "preset": "tiny"}
    spec["parallel"] = {**spec.get("parallel", {}), "cp": 2}
    spec["train"] = {**spec["train"], "steps": STEPS, "eval_every": 8, "checkpoint_every": 8,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}  # the same samples `launcher eval` reads below
    config = home / "cp2.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "cp", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("cp", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == STEPS and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(STEPS))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses[:3], vals)
    # one process, whole sequences, the single-device model: the same loss the two half-sequence ranks logged
    r = launcher("eval", "cp", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)
