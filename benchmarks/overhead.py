"""Tokens/s of the full launcher path (Ray + DeepSpeed + webdataset stream + MLflow) vs a plain PyTorch
loop on the same model, global batch and data, measured in one run. Prints ratios.

    python benchmarks/overhead.py [--steps 60] [--preset tiny]

Steady-state numbers: the median over steps after a warm-up, so start-up (Ray, DeepSpeed init) is
reported separately as wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5


def plain_loop(shards: Path, preset: str, steps: int, global_batch: int, threads: int) -> list[float]:
    """nanoGPT-style: one process, torch AdamW, the same stream, model and schedule-free lr."""
    import models
    from data_pipeline import TokenStream, load_manifest
    from parallel.step import lm_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    manifest = load_manifest(shards)
    model = models.build(models.make_config("transformer", preset, vocab_size=manifest.vocab_size, max_seq_len=manifest.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    stream = TokenStream(shards, seed=0, global_batch=global_batch, micro_batch=global_batch, dp_rank=0, dp_size=1)
    batches = iter(stream.micro_batches())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def launcher_run(shards: Path, preset: str, steps: int, global_batch: int, workers: int, out: Path) -> tuple[list[float], float]:
    env = {**os.environ, "LMFORGE_HOME": str(out / "home")}
    cpus = max(1, (os.cpu_count() or 2) // workers)
    args = [sys.executable, "-m", "launcher.cli", "submit", str(ROOT / "cluster_configs" / "local.yaml"),
            "--name", f"overhead-w{workers}", "--set", f"cluster.workers={workers}", "--set", f"cluster.cpus_per_worker={cpus}",
            "--set", f"model.preset={preset}", "--set", f"data.shards={shards}", "--set", f"data.global_batch={global_batch}",
            "--set", f"data.micro_batch={global_batch // workers}", "--set", f"train.steps={steps}", "--set", "train.eval_every=0",
            "--set", "train.checkpoint_every=0", "--set", f"train.output_dir={out / 'runs'}", "--set", "tracking.system_metrics=false"]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"launcher run failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    uri = re.search(r"tracking uri: (\S+)", r.stdout).group(1)
    run_id = re.search(r"mlflow run id: (\w+)", r.stdout).group(1)
    hist = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "step_time_s"))
    return [v for _, v in hist], wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()

    from data_pipeline import default_shards_dir, prepare

    shards = default_shards_dir("builtin", 8192, a.seq_len)
    prepare("builtin", shards, vocab_size=8192, seq_len=a.seq_len)
    tokens = a.global_batch * a.seq_len
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        threads = os.cpu_count() or 1
        base = statistics.median(plain_loop(shards, a.preset, a.steps, a.global_batch, threads)[WARMUP:])
        results["plain torch loop (1 process)"] = (base, None)
        for workers in (1, 2):
            times, wall = launcher_run(shards, a.preset, a.steps, a.global_batch, workers, Path(tmp))
            results[f"launcher, {workers} Ray worker(s)"] = (statistics.median(times[WARMUP:]), wall)
    print(f"model {a.preset}, global batch {a.global_batch} x {a.seq_len} tokens, {a.steps} steps, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'path':34s} {'step s':>8s} {'tokens/s':>10s} {'ratio':>7s} {'wall s':>8s}")
    for name, (t, wall) in results.items():
        print(f"{name:34s} {t:8.3f} {tokens / t:10.0f} {base / t:7.2f} {wall if wall else float('nan'):8.1f}")
    print(json.dumps({k: {"step_s": v[0], "tokens_per_s": tokens / v[0], "ratio_vs_plain": base / v[0]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
