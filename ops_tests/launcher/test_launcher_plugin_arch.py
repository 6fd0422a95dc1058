"""An architecture outside the package plugs in through `LMFORGE_PLUGINS` and the registry alone:
`launcher plan` plans the test-only toy (ops_tests/toy_arch.py) at tp2×pp2 and cp2 exactly as
parallel/plan.py does in-process, and refuses what it cannot run with one line naming the key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import models
import toy_arch
from launcher.spec import load_spec
from launcher.validate import data_parallel_size, model_config
from parallel.plan import Layout, Workload, make_plan

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"


def _plan(*sets: str, plugins: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_DEBUG": "", "PYTHONPATH": str(Path(toy_arch.__file__).parent)}
    env.pop("LMFORGE_PLUGINS", None)
    if plugins:
        env["LMFORGE_PLUGINS"] = "toy_arch"
    args = [a for s in ("model.arch=toy", "model.preset=tiny", *sets) for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(LOCAL), *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def _want(*sets: str) -> dict:
    spec = load_spec(LOCAL, ["model.arch=toy", "model.preset=tiny", *sets])
    cfg = model_config(spec, vocab_size=spec.data.vocab_size)
    p, d, dp = spec.parallel, spec.data, data_parallel_size(spec)
    plan = make_plan(cfg, Layout(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, zero=p.zero),
                     Workload(d.seq_len, d.micro_batch, d.global_batch // (d.micro_batch * dp), torch.float32))
    return json.loads(json.dumps(plan.to_dict()))


def test_plugin_arch_is_planned_like_any_other():
    for sets in (("cluster.workers=4", "parallel.tp=2", "parallel.pp=2"), ("cluster.workers=2", "parallel.cp=2")):
        r = _plan(*sets)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got == _want(*sets)
        cfg = models.make_config("toy", "tiny", vocab_size=load_spec(LOCAL).data.vocab_size)
        assert got["params_total"] == toy_arch.num_params(cfg)
    tp_pp = json.loads(_plan("cluster.workers=4", "parallel.tp=2", "parallel.pp=2").stdout)
    assert len(tp_pp["stages"]) == 2 and all(0 < st["params"] < tp_pp["params_total"] / 2 for st in tp_pp["stages"])


def test_plugin_arch_refusals_name_the_key():
    r = _plan("cluster.workers=2", "parallel.ep=2")
    assert r.returncode != 0 and "parallel.ep" in r.stderr and "'toy' has no experts to shard" in r.stderr
    r = _plan(plugins=False)
    assert r.returncode != 0 and "model.arch" in r.stderr and "toy" in r.stderr and "transformer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
