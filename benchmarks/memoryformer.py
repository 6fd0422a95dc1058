"""MemoryFormer against dense layers and the Transformer++ (issue 18, specs/memoryformer.md §2, §3).

CPU (default), one run:
1. layer: a Memory Layer d → d (hash + gather, forward + backward, torch path) against a dense `nn.Linear`
   d → d on the same tokens, d ∈ {256, 512, 1024}: time ratio and how it grows with d (the MACs ratio is
   τ = 8: K·d against d²).
2. MACs per token of MemoryFormer and the Transformer++ at the same d and L (forward, exact counts).
3. a short training comparison on the built-in corpus: both models at the same d, L, heads, tokens and data
   order (`TokenStream`, one seed), AdamW with the launcher's warm-up + cosine schedule; val loss,
   parameters, MACs/token, tokens/s.

GPU (`--gpu`, needs CUDA): the Triton gather's achieved bandwidth (bytes of the gathered rows + output)
as a fraction of a device-to-device copy of the same bytes (goal ≥ 0.6), forward and backward; and the
Memory Block against a dense SwiGLU FFN of the same d, bf16, forward + backward.

    python benchmarks/memoryformer.py --steps 20      # a probe
    python benchmarks/memoryformer.py                 # the RESULTS.md numbers
    python benchmarks/memoryformer.py --gpu
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
log = logging.getLogger("memoryformer_bench")


def _cpu_ms(fn, repeats: int, warmup: int = 2) -> float:  # noqa: ANN001
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layer_vs_linear(d: int, tokens: int, tau: int, repeats: int, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Forward + backward (ms) of a Memory Layer d → d (its own hash) and of nn.Linear d → d, same input."""
    from models.layers.memory_layer import HashedMemory

    g = torch.Generator().manual_seed(0)
    mem = HashedMemory(d, d, tau, temperature=1.0, score_fn="official", projection=False, bias=True,
                       backend="auto").to(device, dtype)
    lin = torch.nn.Linear(d, d).to(device, dtype)
    with torch.no_grad():
        mem.memory.tables.normal_(0, 0.02, generator=None)
        mem.memory.bias.zero_()
    x = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=g).to(device, dtype)

    def run(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(dy)

    if device == "cuda":
        from timing import cuda_fwd_bwd_ms

        def reset(m: torch.nn.Module) -> None:
            m.zero_grad(set_to_none=True)
            x.grad = None
        return {"memory": cuda_fwd_bwd_ms(lambda: mem(x), dy, lambda: reset(mem), repeats, 5),
                "linear": cuda_fwd_bwd_ms(lambda: lin(x), dy, lambda: reset(lin), repeats, 5)}
    for _ in range(2):  # warm-up
        run(mem)
        run(lin)
    out = {"memory": [], "linear": []}
    for _ in range(repeats):  # interleaved, so a change in machine load hits both
        out["memory"].append(_cpu_ms(lambda: run(mem), 1, 0))
        out["linear"].append(_cpu_ms(lambda: run(lin), 1, 0))
    return {k: statistics.median(v) for k, v in out.items()}


def macs_comparison(d: int, n_layers: int, heads: int, seq_len: int, vocab: int) -> dict[str, float]:
    import models
    from models.memoryformer import macs_per_token

    mf = models.make_config("memoryformer", "tiny", d_model=d, n_layers=n_layers, n_heads=heads, vocab_size=vocab,
                            max_seq_len=seq_len)
    tf = models.make_config("transformer", "tiny", d_model=d, n_layers=n_layers, n_heads=heads, vocab_size=vocab,
                            max_seq_len=seq_len)
    tf_macs = models.get_spec("transformer").flops_per_token(tf, seq_len) / 6  # its FLOPs are 6 × forward MACs
    return {"memoryformer": macs_per_token(mf, seq_len), "transformer": tf_macs,
            "mf_non_head": macs_per_token(mf, seq_len) - d * vocab, "tf_non_head": tf_macs - d * vocab}


def train(args: argparse.Namespace, cfg: Any, shards: Path) -> dict[str, Any]:
    import models
    from data_pipeline import TokenStream, val_batches
    from parallel.engine import TableGroup, param_groups
    from parallel.schedule import warmup_cosine
    from parallel.step import eval_loss, lm_loss, split_batch

    spec = models.get_spec(cfg.arch)
    model = models.build(cfg, seed=args.seed).train()
    tables = TableGroup(spec.table_params, args.table_lr_multiplier, args.weight_decay) if spec.table_params else None
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay, args.lr, tables), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
        s, warmup_steps=args.warmup, total_steps=args.steps, min_ratio=0.1))
    stream = TokenStream(shards, seed=args.seed, global_batch=args.batch, micro_batch=args.batch, dp_rank=0, dp_size=1)
    batches = stream.micro_batches()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        inputs, targets = split_batch(next(batches), torch.device("cpu"))
        loss = lm_loss(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0:
            log.info("%s step %d loss %.4f", cfg.arch, step, losses[-1])
    train_s = time.perf_counter() - t0
    val = eval_loss(model, val_batches(shards, micro_batch=args.batch, dp_rank=0, dp_size=1,
                                       max_samples=args.eval_samples), torch.device("cpu"))
    return {"params": spec.num_params(cfg), "macs": spec.flops_per_token(cfg, args.seq_len) / 6,
            "tokens_per_s": args.steps * args.batch * args.seq_len / train_s, "loss0": losses[0],
            "last_train": sum(losses[-10:]) / len(losses[-10:]), "val_loss": val}


def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"1. Memory Layer d → d vs nn.Linear d → d, {args.tokens} tokens, fp32, τ 8, forward + backward, "
          f"median of {args.repeats} (torch {torch.__version__}, {args.threads} threads)\n")
    print("| d | K | memory ms | linear ms | memory / linear | MACs ratio linear / memory |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for d in args.dims:
        t = layer_vs_linear(d, args.tokens, 8, args.repeats)
        ratios.append(t["memory"] / t["linear"])
        print(f"| {d} | {d // 8} | {t['memory']:.2f} | {t['linear']:.2f} | {ratios[-1]:.2f} | {8:.1f} |")
    print(f"\nmemory / linear from d {args.dims[0]} to {args.dims[-1]}: × {ratios[-1] / ratios[0]:.2f}")

    m = macs_comparison(args.d_model, args.n_layers, args.heads, args.seq_len, args.vocab)
    print(f"\n2. Forward MACs per token at d {args.d_model}, L {args.n_layers}, seq {args.seq_len}, vocab {args.vocab}: "
          f"MemoryFormer {m['memoryformer'] / 1e6:.3f}M, Transformer++ {m['transformer'] / 1e6:.3f}M "
          f"(ratio {m['memoryformer'] / m['transformer']:.3f}); without the LM head {m['mf_non_head'] / 1e6:.3f}M vs "
          f"{m['tf_non_head'] / 1e6:.3f}M (ratio {m['mf_non_head'] / m['tf_non_head']:.3f})")

    import models
    from data_pipeline import default_shards_dir, prepare

    shards = default_shards_dir("builtin", args.vocab, args.seq_len)
    if not (shards / "manifest.json").is_file():
        prepare("builtin", shards, vocab_size=args.vocab, seq_len=args.seq_len)
    common = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.heads, vocab_size=args.vocab,
                  max_seq_len=args.seq_len)
    rows = {"transformer": train(args, models.make_config("transformer", "tiny", **common), shards),
            "memoryformer": train(args, models.make_config("memoryformer", "tiny", **common), shards)}
    tokens = args.steps * args.batch * args.seq_len
    print(f"\n3. Training, {tokens:,} tokens each ({args.steps} steps × {args.batch} × {args.seq_len}), lr {args.lr}, "
          f"tables' lr × {args.table_lr_multiplier}\n")
    print("| model | params | MACs/token | tokens/s | loss step 0 | train loss (last 10) | val loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['macs'] / 1e6:.3f}M | {r['tokens_per_s']:.0f} | {r['loss0']:.4f} | "
              f"{r['last_train']:.4f} | {r['val_loss']:.4f} |")
    mf, tf = rows["memoryformer"], rows["transformer"]
    print(f"\nmemoryformer / transformer: params {mf['params'] / tf['params']:.2f}, MACs/token {mf['macs'] / tf['macs']:.3f}, "
          f"tokens/s {mf['tokens_per_s'] / tf['tokens_per_s']:.3f}, val loss {mf['val_loss'] - tf['val_loss']:+.4f}")


def gather_bandwidth(rows: int, h: int, K: int, tokens: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Achieved bytes/s of the Triton gather forward (K rows of h read per token, one row written) and of
    its backward, over a device-to-device copy of the forward's bytes."""
    from kernels.hashed_gather import weighted_gather

    dev = "cuda"
    tables = (torch.randn(rows, h, device=dev) * 0.02).to(dtype).requires_grad_()
    idx = torch.randint(0, rows, (tokens, K), device=dev)
    w = torch.rand(tokens, K, device=dev).requires_grad_()
    dy = torch.randn(tokens, h, device=dev).to(dtype)
    el = tables.element_size()
    moved = tokens * K * h * el + tokens * h * el  # rows read + output written
    src = torch.empty(moved // el, device=dev, dtype=dtype)
    dst = torch.empty_like(src)

    def timed(fn) -> float:  # noqa: ANN001
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    copy_ms = timed(lambda: dst.copy_(src))
    fwd_ms = timed(lambda: weighted_gather(tables, idx, w, backend="triton"))

    def fwd_bwd() -> None:
        tables.grad = w.grad = None
        weighted_gather(tables, idx, w, backend="triton").backward(dy)

    fb_ms = timed(fwd_bwd)
    return {"copy_ms": copy_ms, "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "bytes": moved,
            "fwd_fraction": copy_ms / fwd_ms, "copy_GBps": 2 * moved / copy_ms / 1e6, "fwd_GBps": moved / fwd_ms / 1e6}


def block_vs_ffn(d: int, tokens: int, repeats: int) -> dict[str, float]:
    """The Memory Block (ML1 → LayerNorm → ML2, Triton gathers) vs a SwiGLU FFN of the same d, bf16."""
    import models
    from models.layers.mlp import SwiGLU
    from models.memoryformer import MemoryBlock
    from timing import cuda_fwd_bwd_ms

    cfg = models.make_config("memoryformer", "tiny", d_model=d, n_heads=d // 128)
    block = MemoryBlock(cfg).cuda().bfloat16()
    ffn = SwiGLU(d, models.make_config("transformer", "tiny", d_model=d, n_heads=d // 128).ffn_hidden).cuda().bfloat16()
    for p in list(block.parameters()) + list(ffn.parameters()):
        torch.nn.init.normal_(p, 0, 0.02)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)

    def reset(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        x.grad = None
    return {"memory_block": cuda_fwd_bwd_ms(lambda: block(x), dy, lambda: reset(block), repeats, 5),
            "swiglu": cuda_fwd_bwd_ms(lambda: ffn(x), dy, lambda: reset(ffn), repeats, 5)}


def run_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.gpu_tokens} tokens, bf16\n")
    print("| table (rows × h), K | copy ms | gather fwd ms | fwd+bwd ms | fwd GB/s | copy GB/s | fwd / copy |")
    print("|---|---|---|---|---|---|---|")
    for rows, h, K in ((64 * 256, 512, 64), (64 * 1024, 512, 64), (128 * 256, 1024, 128), (256 * 256, 2048, 256)):
        r = gather_bandwidth(rows, h, K, args.gpu_tokens, torch.bfloat16, args.gpu_repeats)
        print(f"| {rows} × {h}, {K} | {r['copy_ms']:.3f} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_GBps']:.0f} | {r['copy_GBps']:.0f} | {r['fwd_fraction']:.2f} |")
    print("\n| d | Memory Block ms | SwiGLU FFN ms | block / FFN |")
    print("|---|---|---|---|")
    for d in (512, 1024, 2048):
        t = block_vs_ffn(d, args.gpu_tokens, args.gpu_repeats)
        print(f"| {d} | {t['memory_block']:.3f} | {t['swiglu']:.3f} | {t['memory_block'] / t['swiglu']:.2f} |")
    for d in (1024, 2048):
        t = layer_vs_linear(d, args.gpu_tokens, 8, args.gpu_repeats, device="cuda", dtype=torch.bfloat16)
        print(f"\nMemory Layer {d} → {d} vs nn.Linear, bf16 fwd+bwd: {t['memory']:.3f} ms vs {t['linear']:.3f} ms "
              f"({t['memory'] / t['linear']:.2f}×)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="*", default=[256, 512, 1024])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per layer timing (CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--table-lr-multiplier", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--gpu-tokens", type=int, default=16 * 1024)
    p.add_argument("--gpu-repeats", type=int, default=20)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()
