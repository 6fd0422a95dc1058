"""`launcher plan` through the real CLI: its JSON is `parallel/plan.py`'s plan of the spec, and a bad
spec or layout fails with one line naming the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import models
from launcher.spec import load_spec
from launcher.validate import data_parallel_size, model_config
from parallel.plan import Layout, Workload, make_plan
from parallel.precision import resolve_dtype

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", "plan", *args], capture_output=True, text=True,
                          env={**os.environ, "LMFORGE_DEBUG": ""}, timeout=300, cwd=ROOT)


def test_plan_json_is_the_plan_of_the_spec():
    r = _cli(str(LOCAL), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    spec = load_spec(LOCAL)
    cfg = model_config(spec, vocab_size=spec.data.vocab_size)
    dp = data_parallel_size(spec)
    d = spec.data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what `device: auto` means here
    want = make_plan(cfg, Layout(dp=dp, zero=spec.parallel.zero),
                     Workload(d.seq_len, d.micro_batch, d.global_batch // (d.micro_batch * dp), resolve_dtype("auto", device)))
    assert got == json.loads(json.dumps(want.to_dict()))
    assert got["params_total"] == models.get_spec("transformer").num_params(cfg)
    assert got["layout"]["world"] == spec.cluster.workers and len(got["stages"]) == 1
    for key in ("params", "weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "activations_checkpointed_bytes", "flops_per_token"):
        assert got["stages"][0][key] > 0, key


def test_plan_json_with_pipeline_stages():
    r = _cli(str(LOCAL), "--json", "--world", "2", "--set", "parallel.pp=2")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)  # nothing else on stdout (DeepSpeed logs there)
    assert got["layout"]["pp"] == 2 and [st["ranks"] for st in got["stages"]] == [[0, 0], [1, 1]]
    assert sum(st["params"] for st in got["stages"]) == got["params_total"]  # untied: each block on one stage


def test_plan_table_with_world_and_step_time():
    r = _cli(str(LOCAL), "--world", "4", "--set", "data.global_batch=32", "--peak-tflops", "100")
    assert r.returncode == 0, r.stderr
    assert "world 4 = pp 1 × dp 4" in r.stdout and "predicted step" in r.stdout and "optimizer" in r.stdout


def test_bad_key_and_bad_layout_fail_with_the_key_named():
    for args, key in ((["--set", "train.stepz=5"], "train.stepz"),
                      (["--world", "3", "--set", "parallel.tp=3"], "parallel.tp")):  # tiny has 4 heads
        r = _cli(str(LOCAL), "--json", *args)
        assert r.returncode == 2, r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), r.stderr
        assert r.stdout == ""
