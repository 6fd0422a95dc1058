"""RMT vs Transformer++ on the built-in corpus, and the RMT's residual-size sweep (issue 17, spec §4.4).

One process, fp32, the same train samples in the same order for every model (`TokenStream`, one seed),
AdamW with the launcher's warm-up + cosine schedule, one evaluation at the end on the same val samples.
Each model trains with its own objective (the RMT with its z-loss); val loss is plain cross-entropy.

- `transformer`: the Transformer++ baseline (d, L, heads as given).
- `rmt-params`: an RMT with R·Dv = d, L layers, residual Dk·Dv, D_FF chosen so its non-embedding
  parameters match the baseline's (everything but the token table(s) and the vocabulary projection).
- `rmt-flops`: the same RMT with D_FF chosen so its training FLOPs per token match the baseline's.
- `dk<N>`: the sweep, Dk ∈ {8, 16, 32, 64} at the `rmt-params` Dv, R, D_FF.

    python benchmarks/rmt_vs_transformer.py --steps 20       # a probe
    python benchmarks/rmt_vs_transformer.py                  # the RESULTS.md table
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("rmt_vs_transformer")


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the token table(s) and the vocabulary projection (positions count: the
    transformer's rotary tables are not parameters, the RMT's learned ones are)."""
    skip = ("tok_embeddings.weight", "tok_embeddings.table.weight", "output.weight", "output.proj.weight")
    return sum(p.numel() for n, p in model.named_parameters() if n not in skip)


def rmt_config(args: argparse.Namespace, d_key: int, d_ff: int) -> Any:
    import models

    return models.make_config("rmt", "tiny", d_key=d_key, d_value=args.d_model // args.rank, rank=args.rank,
                              n_layers=args.n_layers, d_ff=d_ff, vocab_size=args.vocab, max_seq_len=args.seq_len)


def matched_d_ff(args: argparse.Namespace, d_key: int, measure, target: float) -> int:  # noqa: ANN001
    """The D_FF whose `measure(cfg)` is closest to `target` (both grow linearly in D_FF)."""
    a, b = measure(rmt_config(args, d_key, 64)), measure(rmt_config(args, d_key, 128))
    return max(1, round(64 + (target - a) / ((b - a) / 64)))


def configs(args: argparse.Namespace) -> dict[str, Any]:
    import models
    from models.rmt import flops_per_token as rmt_flops

    base = models.make_config("transformer", "tiny", d_model=args.d_model, n_layers=args.n_layers, n_heads=args.rank,
                              vocab_size=args.vocab, max_seq_len=args.seq_len)
    spec = models.get_spec("transformer")
    with torch.device("meta"):
        base_params = non_embedding_params(models.build(base))

    def params(cfg: Any) -> int:
        with torch.device("meta"):
            return non_embedding_params(models.build(cfg))

    base_flops = spec.flops_per_token(base, args.seq_len)
    ff_params = matched_d_ff(args, args.d_key, params, base_params)
    ff_flops = matched_d_ff(args, args.d_key, lambda c: rmt_flops(c, args.seq_len), base_flops)
    out = {"transformer": base, "rmt-params": rmt_config(args, args.d_key, ff_params),
           "rmt-flops": rmt_config(args, args.d_key, ff_flops)}
    for dk in args.sweep:
        out[f"dk{dk}"] = rmt_config(args, dk, ff_params)
    return out


def train(args: argparse.Namespace, name: str, cfg: Any, shards: Path) -> dict[str, Any]:
    import models
    from data_pipeline import TokenStream, val_batches
    from parallel.engine import param_groups
    from parallel.schedule import warmup_cosine
    from parallel.step import ModelLoss, eval_loss, lm_loss, split_batch

    spec = models.get_spec(cfg.arch)
    model = models.build(cfg, seed=args.seed).train()
    loss_fn = ModelLoss(lm_loss, z_loss=spec.z_loss(cfg) if spec.z_loss else 0.0)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.lr), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
        s, warmup_steps=args.warmup, total_steps=args.steps, min_ratio=0.1))
    stream = TokenStream(shards, seed=args.seed, global_batch=args.batch, micro_batch=args.batch, dp_rank=0, dp_size=1)
    batches = stream.micro_batches()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        inputs, targets = split_batch(next(batches), torch.device("cpu"))
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0:
            log.info("%s step %d loss %.4f", name, step, losses[-1])
    train_s = time.perf_counter() - t0
    val = eval_loss(model, val_batches(shards, micro_batch=args.batch, dp_rank=0, dp_size=1,
                                       max_samples=args.eval_samples), torch.device("cpu"))
    with torch.device("meta"):
        meta = models.build(cfg)
    return {"name": name, "params": spec.num_params(cfg), "non_embedding": non_embedding_params(meta),
            "flops": spec.flops_per_token(cfg, args.seq_len),
            "tokens_per_s": args.steps * args.batch * args.seq_len / train_s,
            "loss0": losses[0], "last_train": sum(losses[-10:]) / len(losses[-10:]), "val_loss": val, "cfg": cfg}


def describe(cfg: Any) -> str:
    if cfg.arch == "transformer":
        return f"Transformer++ d {cfg.d_model}, L {cfg.n_layers}, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}"
    return (f"RMT Dk {cfg.d_key}, Dv {cfg.d_value}, R {cfg.rank}, L {cfg.n_layers}, D_FF {cfg.d_ff} "
            f"(residual {cfg.residual_size})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=128, help="the baseline's d = the RMT's R·Dv")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="heads of both models (the RMT's R)")
    p.add_argument("--d-key", type=int, default=16, help="the compared RMT's Dk (residual Dk·Dv)")
    p.add_argument("--sweep", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from data_pipeline import default_shards_dir, prepare

    shards = default_shards_dir("builtin", args.vocab, args.seq_len)
    if not (shards / "manifest.json").is_file():
        prepare("builtin", shards, vocab_size=args.vocab, seq_len=args.seq_len)
    cfgs = configs(args)
    done: dict[tuple, dict[str, Any]] = {}
    rows = []
    for name, cfg in cfgs.items():
        key = tuple(sorted(vars(cfg).items()))
        if key not in done:  # the sweep's Dk = --d-key point is the rmt-params model: trained once
            done[key] = train(args, name, cfg, shards)
        rows.append((name, done[key]))
        log.info("%s: %s", name, {k: v for k, v in done[key].items() if k != "cfg"})

    tokens = args.steps * args.batch * args.seq_len
    print(f"\n{tokens:,} tokens each ({args.steps} steps × {args.batch} × {args.seq_len}), vocab {args.vocab}\n")
    print("| model | config | params | non-embedding | FLOPs/token | tokens/s | loss step 0 | train loss (last 10) "
          "| val loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {describe(r['cfg'])} | {r['params']:,} | {r['non_embedding']:,} | {r['flops'] / 1e6:.2f}M | "
              f"{r['tokens_per_s']:.0f} | {r['loss0']:.4f} | {r['last_train']:.4f} | {r['val_loss']:.4f} |")
    base = dict(rows)["transformer"]
    for name in ("rmt-params", "rmt-flops"):
        r = dict(rows)[name]
        print(f"\n{name} / transformer: non-embedding params {r['non_embedding'] / base['non_embedding']:.3f}, "
              f"FLOPs/token {r['flops'] / base['flops']:.3f}, tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.3f}, "
              f"val loss {r['val_loss'] - base['val_loss']:+.4f}")
    sweep = [dict(rows)[f"dk{dk}"] for dk in args.sweep]
    if sweep:
        vals = [r["val_loss"] for r in sweep]
        falls = all(b < a for a, b in zip(vals, vals[1:]))
        val_text = ", ".join(f"{v:.4f}" for v in vals)
        flops_text = ", ".join(f"{r['flops'] / 1e6:.2f}M" for r in sweep)
        print(f"\nDk sweep {args.sweep}: val loss {val_text}; FLOPs/token {flops_text} "
              f"(×{sweep[-1]['flops'] / sweep[0]['flops']:.3f} end to end); "
              f"loss falls monotonically as Dk grows: {'yes' if falls else 'no'}")
        log.info("ln V = %.4f", math.log(args.vocab))


if __name__ == "__main__":
    main()
