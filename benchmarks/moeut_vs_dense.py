"""MoEUT 44M vs a parameter-matched dense Transformer++, same tokens, through the real `launcher` CLI.

Both jobs: built-in corpus at the MoEUT vocabulary (8000), same seq_len, batch, seed, steps, LR schedule and
worker count, one evaluation at the end. Results are read back from MLflow (`status --json` names the run).
MACs/token follow the MoEUT spec (§1.6): projection multiply-accumulates per token, routers included,
attention matrix and LM head excluded; the totals with the LM head are printed too.

    python benchmarks/moeut_vs_dense.py --steps 10 --prefix probe   # seconds/step first
    python benchmarks/moeut_vs_dense.py                             # 20 steps x 16 x 256 tokens each
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOCAL = ROOT / "cluster_configs" / "local.yaml"
log = logging.getLogger("moeut_vs_dense")


def dense_macs_per_token(cfg: Any) -> int:
    """q/k/v/o projections and the three SwiGLU matrices per layer; attention matrix and LM head excluded."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (2 * cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd)
    return cfg.n_layers * (attn + 3 * d * cfg.ffn_hidden)


def model_sets(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {
        "moeut": {"arch": "moeut", "preset": "44m"},
        "dense": {"arch": "transformer", "preset": "tiny", "d_model": args.dense_d, "n_layers": args.dense_layers,
                  "n_heads": args.dense_heads, "ffn_hidden": args.dense_ffn},
    }


def describe(model: dict[str, Any], vocab: int, seq_len: int) -> dict[str, int]:
    """Parameters and MACs/token (spec convention, and with the d x vocab LM head) from the arch's config."""
    import models
    from models.moeut import macs_per_token

    overrides = {k: v for k, v in model.items() if k not in ("arch", "preset")}
    cfg = models.make_config(model["arch"], model["preset"], vocab_size=vocab, max_seq_len=seq_len, **overrides)
    macs = macs_per_token(cfg) if model["arch"] == "moeut" else dense_macs_per_token(cfg)
    return {"params": models.get_spec(model["arch"]).num_params(cfg), "macs": macs,
            "macs_head": macs + cfg.d_model * cfg.vocab_size}


def launcher(args: argparse.Namespace, *cli: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_HOME": str(args.output_dir)}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *cli], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def train(args: argparse.Namespace, key: str, model: dict[str, Any]) -> dict[str, Any]:
    name = f"{args.prefix}-{key}-{args.steps}"
    sets = {f"model.{k}": v for k, v in model.items()} | {
        "cluster.workers": args.workers, "cluster.cpus_per_worker": 2 // args.workers,
        "data.vocab_size": args.vocab, "data.seq_len": args.seq_len, "data.micro_batch": args.micro_batch,
        "data.global_batch": args.global_batch, "data.eval_samples": args.eval_samples,
        "optim.lr": args.lr, "optim.warmup_steps": args.warmup,
        "train.steps": args.steps, "train.eval_every": args.steps, "train.checkpoint_every": 0,
        "train.seed": args.seed, "train.output_dir": str(args.output_dir), "tracking.system_metrics": "false",
    }
    cli = ["submit", str(LOCAL), "--name", name] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    log.info("%s: launcher %s", key, " ".join(cli))
    t0 = time.perf_counter()
    r = launcher(args, *cli, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        logs = args.output_dir / name / "logs"
        raise SystemExit(f"{key} failed (rc {r.returncode}); stderr tail:\n{r.stderr[-3000:]}\nlogs: {logs}")
    st = launcher(args, "status", name, "--json", timeout=120)
    ml = json.loads(st.stdout)["mlflow"]
    from mlflow import MlflowClient

    client = MlflowClient(ml["tracking_uri"])

    def history(metric: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(ml["run_id"], metric))

    tps = [v for s, v in history("tokens_per_s") if s >= 2] or [v for _, v in history("tokens_per_s")]
    out = {"name": name, "wall_s": wall, "steps": args.steps, "tokens": args.steps * args.global_batch * args.seq_len,
           "tokens_per_s": statistics.median(tps), "loss0": history("loss")[0][1],
           "val_loss": history("val_loss")[-1][1], "run_id": ml["run_id"], "uri": ml["tracking_uri"]}
    log.info("%s: %s", key, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, choices=(1, 2), default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-d", type=int, default=416)
    p.add_argument("--dense-layers", type=int, default=16)
    p.add_argument("--dense-heads", type=int, default=8)
    p.add_argument("--dense-ffn", type=int, default=1332)
    p.add_argument("--only", choices=("moeut", "dense"), action="append", help="run only these (default both)")
    p.add_argument("--prefix", default="mvd")
    p.add_argument("--output-dir", type=Path, default=Path("/tmp/moeut_vs_dense"))
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for key, model in model_sets(args).items():
        if args.only and key not in args.only:
            continue
        info = describe(model, args.vocab, args.seq_len)
        log.info("%s: %s params, %.2fM MACs/token (spec), %.2fM incl. LM head", key, f"{info['params']:,}",
                 info["macs"] / 1e6, info["macs_head"] / 1e6)
        rows.append((key, model, info, train(args, key, model)))

    print("| model | params | MACs/token (spec convention) | MACs/token incl. head | tokens | steps | wall s | "
          "tokens/s | final val_loss |\n|---|---|---|---|---|---|---|---|---|")
    for key, model, info, res in rows:
        label = "MoEUT 44m" if key == "moeut" else (
            f"dense Transformer++ d {model['d_model']}, {model['n_layers']} layers, {model['n_heads']} heads, "
            f"ffn {model['ffn_hidden']}")
        print(f"| {label} | {info['params']:,} | {info['macs'] / 1e6:.2f}M | {info['macs_head'] / 1e6:.2f}M | "
              f"{res['tokens']:,} | {res['steps']} | {res['wall_s']:.0f} | {res['tokens_per_s']:.0f} | "
              f"{res['val_loss']:.4f} |")
    if len(rows) == 2:
        (_, _, mi, mr), (_, _, di, dr) = rows
        print(f"\nMoEUT / dense: params {mi['params'] / di['params']:.4f}, MACs/token (spec) {mi['macs'] / di['macs']:.3f}, "
              f"incl. head {mi['macs_head'] / di['macs_head']:.3f}, tokens/s {mr['tokens_per_s'] / dr['tokens_per_s']:.3f}, "
              f"val_loss {mr['val_loss']:.4f} vs {dr['val_loss']:.4f} ({mr['val_loss'] - dr['val_loss']:+.4f})")


if __name__ == "__main__":
    main()
