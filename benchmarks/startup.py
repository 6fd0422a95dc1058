"""Submit -> first training step of the tiny default job, phase by phase, next to a plain script that does
the least the same step needs, in one run on the same machine.

- lmforge: `launcher submit cluster_configs/local.yaml` (embedded Ray cluster, 2 CPU ranks, prepared data,
  `train.steps=1`, no eval, no checkpoint), timed from the CLI process's start; phases from
  `status --json`'s `startup` (seconds since the driver process started).
- plain: a script spawning 2 ranks with torch.multiprocessing (gloo over a FileStore), each building the
  same model and DeepSpeed engine and taking one step on the same shards; timed from its process's start to
  rank 0's first step.

    python benchmarks/startup.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "cluster_configs" / "local.yaml"

PLAIN = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[3])

    def rank_main(rank, world, store, out):
        os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # what DeepSpeed reads
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        torch.set_num_threads(1)
        import models
        from data_pipeline import TokenStream
        from launcher.spec import load_spec
        from launcher.orchestrator import resolve_shards
        from launcher.validate import model_config
        from parallel.engine import EngineConfig, build_engine
        from parallel.step import train_step
        spec = load_spec(sys.argv[4])
        shards = resolve_shards(spec)
        d = spec.data
        stream = TokenStream(shards, seed=0, global_batch=d.global_batch, micro_batch=d.micro_batch, dp_rank=rank, dp_size=world)
        model = models.build(model_config(spec, vocab_size=stream.manifest.vocab_size), seed=0)
        engine = build_engine(model, EngineConfig(micro_batch=d.micro_batch, grad_accum=d.global_batch // (d.micro_batch * world),
                                                  dp=world, zero=spec.parallel.zero, lr=1e-3, warmup_steps=1, total_steps=1))
        batches = iter(stream)
        train_step(engine, [next(batches) for _ in range(engine.gradient_accumulation_steps())], torch.device("cpu"))
        if rank == 0:
            open(out, "w").write(json.dumps({"first_step": time.time()}))

    if __name__ == "__main__":
        mp.spawn(rank_main, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
""")


def lmforge(tmp: Path) -> dict:
    home = tmp / "home"
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    sets = {"train.steps": 1, "train.eval_every": 0, "train.checkpoint_every": 0, "train.output_dir": tmp / "runs",
            "tracking.system_metrics": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "submit", str(LOCAL), "--name", "startup", *args],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    total = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"lmforge job failed:\n{r.stderr[-3000:]}")
    st = json.loads(subprocess.run([sys.executable, "-m", "launcher.cli", "status", "startup", "--json"],
                                   capture_output=True, text=True, env=env, cwd=ROOT).stdout)
    return {"phases": st["startup"], "first_step": st["startup"]["first_step"], "total": total}


def plain(tmp: Path) -> dict:
    out, script = tmp / "plain.json", tmp / "plain_step.py"  # a file: spawned ranks re-import their __main__
    script.write_text(PLAIN)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(script), str(tmp / "store"), str(out), str(ROOT), str(LOCAL)],
                       capture_output=True, text=True, cwd=ROOT)
    total = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"plain script failed:\n{r.stderr[-3000:]}")
    return {"first_step": json.loads(out.read_text())["first_step"] - t0, "total": total}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ours = lmforge(Path(tmp))
        base = plain(Path(tmp))
    print("lmforge submit -> first step, by phase (s since the CLI started; the step before it):")
    prev = 0.0
    for name, t in ours["phases"].items():
        print(f"  {name:<18} {t:7.2f}  (+{t - prev:5.2f})")
        prev = t
    print(f"lmforge first step {ours['first_step']:7.2f} s   (whole command {ours['total']:.2f} s)")
    print(f"plain   first step {base['first_step']:7.2f} s   (whole command {base['total']:.2f} s)")
    print(f"ratio (first step)  {ours['first_step'] / base['first_step']:.2f}x   goal <= 1.5x")


if __name__ == "__main__":
    main()
