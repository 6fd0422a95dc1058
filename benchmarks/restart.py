"""Cost of fault tolerance, measured in one run per model size:

1. checkpoint save / load through our atomic path (DeepSpeed engine state + consolidated export +
   manifest with sha256), on 2 gloo ranks with ZeRO-1, against a plain `torch.save` / `torch.load`
   of the same model and AdamW state in one process (the baseline; ratio printed);
2. seconds from SIGKILL of one worker of a real `launcher submit --detach` job to the first
   training step finished after the automatic restart, against the job's cold start (submit to
   first step) in the same run.

    python benchmarks/restart.py [--presets tiny,125m]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The project first (ops_tests/ has folders named like its packages), then the tests' gloo harness (spawn_ranks).
sys.path[:0] = [str(ROOT)]
sys.path.append(str(ROOT / "ops_tests"))

# Smaller batches for the larger model keep a CPU step in seconds; the checkpoint size does not depend on them.
BATCH = {"tiny": (16, 8), "125m": (2, 1)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _engine(preset: str, world: int, vocab: int, seq_len: int):
    import models
    from parallel.engine import EngineConfig, build_engine

    torch.manual_seed(0)
    model = models.build(models.make_config("transformer", preset, vocab_size=vocab, max_seq_len=seq_len))
    return build_engine(model, EngineConfig(micro_batch=1, grad_accum=1, dp=world, zero=1, total_steps=10))


def _one_step(engine, rank: int, vocab: int, seq_len: int) -> None:
    from parallel.step import train_step

    g = torch.Generator().manual_seed(rank)
    train_step(engine, [torch.randint(0, vocab, (1, seq_len + 1), generator=g)], torch.device("cpu"))


def _save_load(rank: int, world: int, preset: str, root: str, vocab: int, seq_len: int) -> dict:
    import torch.distributed as dist

    from parallel import checkpoint

    engine = _engine(preset, world, vocab, seq_len)
    _one_step(engine, rank, vocab, seq_len)
    dist.barrier()
    t0 = time.perf_counter()
    path = checkpoint.save(engine, Path(root), 1, {"step": 1}, {"dp": world, "world": world}, keep=1)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint.load(engine, checkpoint.latest_good(Path(root)))  # includes the sha256 verification
    load_s = time.perf_counter() - t0
    return {"save_s": save_s, "load_s": load_s, "bytes": _du(path)}


def _plain(rank: int, world: int, preset: str, root: str, vocab: int, seq_len: int) -> dict:
    import models

    torch.manual_seed(0)
    model = models.build(models.make_config("transformer", preset, vocab_size=vocab, max_seq_len=seq_len))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, vocab, (1, seq_len + 1))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    path = Path(root) / "plain.pt"
    t0 = time.perf_counter()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["opt"])
    return {"save_s": save_s, "load_s": time.perf_counter() - t0, "bytes": path.stat().st_size}


def checkpoint_times(preset: str, vocab: int, seq_len: int) -> dict:
    from spawn_ranks import spawn_ranks

    with tempfile.TemporaryDirectory(dir=ROOT) as a, tempfile.TemporaryDirectory(dir=ROOT) as b:
        plain = spawn_ranks(_plain, 1, preset, a, vocab, seq_len)[0]
        ours = spawn_ranks(_save_load, 2, preset, b, vocab, seq_len)
    return {"plain": plain, "ours": {k: max(r[k] for r in ours) for k in ("save_s", "load_s", "bytes")}}


def _reports(job_dir: Path) -> list[dict]:
    out = []
    for p in (job_dir / "workers").glob("rank*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            pass
    return out


def _wait(pred, timeout_s: float = 1800, poll_s: float = 0.1):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise SystemExit("timed out")


def kill_restart(preset: str, home: Path) -> dict:
    gb, mb = BATCH[preset]
    sets = {"model.preset": preset, "data.global_batch": gb, "data.micro_batch": mb, "train.steps": 1000,
            "train.eval_every": 0, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
            "train.output_dir": home / "runs", "tracking.system_metrics": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    cli = [sys.executable, "-m", "launcher.cli"]
    t_submit = time.perf_counter()
    subprocess.run([*cli, "submit", str(ROOT / "cluster_configs" / "local.yaml"), "--name", "bench", "--detach", *args],
                   check=True, env=env, capture_output=True)
    job_dir = home / "runs" / "bench"
    _wait(lambda: any(r.get("attempt") == 0 and r["step"] >= 1 for r in _reports(job_dir)))
    cold = time.perf_counter() - t_submit
    # Kill right after a checkpoint is published, so the restart redoes no steps.
    _wait(lambda: (job_dir / "checkpoints" / "latest").is_file())
    latest = (job_dir / "checkpoints" / "latest").read_text()
    _wait(lambda: (job_dir / "checkpoints" / "latest").read_text() != latest)
    ckpt_step = int((job_dir / "checkpoints" / "latest").read_text().split("_")[1])
    victim = next(r for r in _reports(job_dir) if r["rank"] == 1)
    t_kill = time.perf_counter()
    os.kill(victim["pid"], signal.SIGKILL)
    _wait(lambda: any(r.get("attempt", 0) >= 1 for r in _reports(job_dir)), poll_s=0.05)
    up = time.perf_counter() - t_kill
    _wait(lambda: any(r.get("attempt", 0) >= 1 and r["step"] > ckpt_step for r in _reports(job_dir)), poll_s=0.05)
    first_step = time.perf_counter() - t_kill
    subprocess.run([*cli, "stop", "bench"], env=env, capture_output=True)
    _wait(lambda: json.loads((job_dir / "state.json").read_text()).get("state") in ("STOPPED", "SUCCEEDED", "FAILED"))
    return {"cold_start_to_first_step_s": cold, "kill_to_new_workers_s": up, "kill_to_first_step_s": first_step,
            "checkpoint_step": ckpt_step}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,125m")
    a = p.parse_args()
    from data_pipeline import default_shards_dir, load_manifest, prepare

    shards = default_shards_dir("builtin", 8192, 128)
    prepare("builtin", shards, vocab_size=8192, seq_len=128)
    vocab = load_manifest(shards).vocab_size
    print(f"{os.cpu_count()} cores, torch {torch.__version__}; 2 gloo ranks, ZeRO-1, fp32")
    results = {}
    for preset in a.presets.split(","):
        import models

        n = models.get_spec("transformer").num_params(models.make_config("transformer", preset, vocab_size=vocab, max_seq_len=128))
        ck = checkpoint_times(preset, vocab, 128)
        with tempfile.TemporaryDirectory() as home:
            kr = kill_restart(preset, Path(home))
        results[preset] = {"params": n, **ck, **kr}
        pl, ours = ck["plain"], ck["ours"]
        print(f"\n{preset}: {n / 1e6:.1f}M parameters")
        print(f"  checkpoint save  {ours['save_s']:7.2f} s  ({ours['bytes'] / 1e6:8.1f} MB)   plain torch.save {pl['save_s']:6.2f} s "
              f"({pl['bytes'] / 1e6:7.1f} MB)   ratio {ours['save_s'] / pl['save_s']:5.2f}x")
        print(f"  checkpoint load  {ours['load_s']:7.2f} s (verify + load)       plain torch.load {pl['load_s']:6.2f} s"
              f"              ratio {ours['load_s'] / pl['load_s']:5.2f}x")
        print(f"  kill -> new worker group {kr['kill_to_new_workers_s']:6.1f} s; kill -> first step after restart "
              f"{kr['kill_to_first_step_s']:6.1f} s; cold start (submit -> first step) {kr['cold_start_to_first_step_s']:6.1f} s; "
              f"ratio restart/cold {kr['kill_to_first_step_s'] / kr['cold_start_to_first_step_s']:4.2f}")
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
