"""Forward+backward time of the chunked delta rule vs the token-by-token loop vs causal softmax attention,
and how each grows with the sequence length T.

CPU (default): `chunk_delta_rule(..., backend="torch")` (chunk 64), the token loop
`delta_rule_recurrent` and `scaled_dot_product_attention(is_causal=True)` at T = 512 … 4096, one fixed
shape otherwise (B 1, H 4, head dim 64, fp32; k L2-normalised, beta = sigmoid(randn)). Each time is a
median over repeats after a warm-up, the three run round-robin in this process (load from other
processes hits all alike); ratios are token loop / chunked and attention / chunked, and "growth" is
time(T) / time(T/2): ~2 for linear cost, ~4 for quadratic. torch uses `--threads` intra-op threads
(default: all cores, as the plain loop in overhead.py; on a machine shared with other jobs,
`--threads 1` avoids OpenMP stalls when a thread is descheduled).

GPU (`--gpu`, needs CUDA): our Triton path `chunk_delta_rule(..., backend="triton")` vs
flash-linear-attention's `fla.ops.delta_rule.chunk_delta_rule` (when installed) vs SDPA with the
flash backend, at B·T = 16K tokens, H 16, head dim 128, bf16, T ∈ {2K, 8K, 16K}; CUDA-event timing;
ratios vs fla (vs SDPA when fla is absent).

    python benchmarks/delta_rule.py [--lengths 512 1024 2048 4096] [--repeats 5] [--loop-repeats 3]
    python benchmarks/delta_rule.py --gpu
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.timing import cuda_fwd_bwd_ms  # noqa: E402
from kernels.delta_rule import chunk_delta_rule, delta_rule_recurrent  # noqa: E402

log = logging.getLogger("benchmarks.delta_rule")


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Leaf tensors in the delta rule's seq-first layout [B,T,H,D] plus the same q/k/v head-first
    ([B,H,T,D], contiguous) for attention, and the output gradients for both."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    q, v, do = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    k = F.normalize(rnd(B, T, H, D), dim=-1)  # in fp32: bf16 L2-norm is not unit enough (spec §7)
    beta = rnd(B, T, H).sigmoid()
    leaf = lambda x: x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    head_first = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    return {"q": leaf(q), "k": leaf(k), "v": leaf(v), "beta": leaf(beta), "do": do.to(device=device, dtype=dtype),
            "qa": leaf(head_first(q)), "ka": leaf(head_first(k)), "va": leaf(head_first(v)),
            "doa": head_first(do).to(device=device, dtype=dtype)}


def _clear_grads(x: dict) -> None:
    for t in x.values():
        if t.requires_grad:
            t.grad = None


# ---------------------------------------------------------------------------------------------- CPU


def _fwd_bwd(fwd: Callable[[], torch.Tensor], grad: torch.Tensor, x: dict) -> tuple[float, float]:
    """Wall time (s) of the forward and of the backward of `fwd().backward(grad)`."""
    _clear_grads(x)
    t0 = time.perf_counter()
    out = fwd()
    t1 = time.perf_counter()
    out.backward(grad)
    return t1 - t0, time.perf_counter() - t1


def cpu_time_interleaved(methods: dict, x: dict, repeats: dict[str, int], warmup: dict[str, int]) -> dict[str, dict]:
    """Per method: median (and min) forward, backward and total time over its repeats after its warm-up.

    Methods run round-robin (one call of each per round), so load from other processes on a shared
    machine lands on all of them alike and the ratios stay meaningful."""
    for name, (fwd, grad) in methods.items():
        for _ in range(warmup[name]):
            _fwd_bwd(fwd, grad, x)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for r in range(max(repeats.values())):
        for name, (fwd, grad) in methods.items():
            if r < repeats[name]:
                runs[name].append(_fwd_bwd(fwd, grad, x))
    out = {}
    for name, rs in runs.items():
        total = [f + b for f, b in rs]
        out[name] = {"fwd": statistics.median(f for f, _ in rs), "bwd": statistics.median(b for _, b in rs),
                     "total": statistics.median(total), "total_min": min(total), "n": len(rs)}
    return out


def cpu_methods(x: dict, chunk: int) -> dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]]:
    return {
        "chunked": (lambda: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], chunk_size=chunk, backend="torch")[0], x["do"]),
        "loop": (lambda: delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"])[0], x["do"]),
        "attn": (lambda: F.scaled_dot_product_attention(x["qa"], x["ka"], x["va"], is_causal=True), x["doa"]),
    }


def growth(times: list[float], lengths: list[int]) -> list[float | None]:
    """Growth factor per doubling of T between consecutive lengths: (t2/t1)^(1/log2(T2/T1))."""
    out: list[float | None] = [None]
    for (t1, T1), (t2, T2) in zip(zip(times, lengths), zip(times[1:], lengths[1:])):
        out.append((t2 / t1) ** (1 / math.log2(T2 / T1)))
    return out


def run_cpu(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    B, H, D = a.batch, a.heads, a.head_dim
    print(f"CPU: B {B}, H {H}, head dim {D}, fp32, chunk {a.chunk}, {torch.get_num_threads()} torch threads "
          f"({os.cpu_count()} cores), torch {torch.__version__}; median of {a.repeats} fwd+bwd "
          f"(token loop: {a.loop_repeats}) after {a.warmup} warm-up")

    # Sanity: the three paths see the same inputs; chunked and token loop must agree.
    x = make_inputs(B, a.lengths[0], H, D, torch.float32, "cpu")
    with torch.no_grad():
        o_c = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], chunk_size=a.chunk, backend="torch")[0]
        o_l = delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"])[0]
    print(f"check at T {a.lengths[0]}: max |chunked - token loop| = {(o_c - o_l).abs().max().item():.1e}")

    res: dict[str, list[dict]] = {"chunked": [], "loop": [], "attn": []}
    for i, T in enumerate(a.lengths):
        x = make_inputs(B, T, H, D, torch.float32, "cpu")
        # The token loop costs seconds per call at large T: fewer repeats, and its warm-up runs at the first
        # length only (first-call costs do not depend on T).
        repeats = {"chunked": a.repeats, "attn": a.repeats, "loop": a.loop_repeats}
        warmup = {"chunked": a.warmup, "attn": a.warmup, "loop": a.warmup if i == 0 else 0}
        log.info("T %d: %s warm-up, %s timed (round-robin)", T, warmup, repeats)
        for name, r in cpu_time_interleaved(cpu_methods(x, a.chunk), x, repeats, warmup).items():
            res[name].append(r)
        del x

    tot = {name: [r["total"] for r in rows] for name, rows in res.items()}
    gr = {name: growth(t, a.lengths) for name, t in tot.items()}
    fmt = lambda g: "–" if g is None else f"{g:.2f}"  # noqa: E731
    print(f"{'T':>5} {'chunked s':>10} {'loop s':>9} {'attn s':>9} {'loop/chunked':>13} {'attn/chunked':>13} "
          f"{'growth chunked':>15} {'growth loop':>12} {'growth attn':>12}   fwd only: {'chunked':>8} {'loop':>8} {'attn':>8}")
    for i, T in enumerate(a.lengths):
        c, lp, at = (res[n][i] for n in ("chunked", "loop", "attn"))
        print(f"{T:>5} {c['total']:>10.4f} {lp['total']:>9.3f} {at['total']:>9.4f} {lp['total'] / c['total']:>13.1f} "
              f"{at['total'] / c['total']:>13.2f} {fmt(gr['chunked'][i]):>15} {fmt(gr['loop'][i]):>12} {fmt(gr['attn'][i]):>12}"
              f"   {'':>9} {c['fwd']:>8.4f} {lp['fwd']:>8.3f} {at['fwd']:>8.4f}")
    print(json.dumps({"device": "cpu", "lengths": a.lengths,
                      **{name: [{k: round(v, 6) for k, v in r.items()} for r in rows] for name, rows in res.items()}}))


# ---------------------------------------------------------------------------------------------- GPU


def _fla_delta_rule() -> Callable | None:
    """fla's chunk_delta_rule, called with [B,T,H,K] inputs; None when fla is not installed."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule as fla_chunk
    except ImportError as e:
        log.warning("flash-linear-attention not importable (%s): no fla row", e)
        return None
    # Older fla releases take head_first (default True = [B,H,T,K]); recent ones deprecate it and are
    # seq-first only. Ask for seq-first explicitly where the argument still exists.
    extra = {"head_first": False} if "head_first" in inspect.signature(fla_chunk).parameters else {}
    return lambda q, k, v, beta: fla_chunk(q, k, v, beta, **extra)[0]


def _ours_triton() -> Callable | None:
    try:
        from kernels.delta_rule.triton_impl import chunk_delta_rule_triton  # noqa: F401 - presence check only
    except ImportError as e:
        log.warning("our Triton path is not importable (%s): no row for it", e)
        return None
    return lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta, chunk_size=64, backend="triton")[0]


def run_gpu(a: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (torch.cuda.is_available() is False)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens, H, D, dtype = a.gpu_tokens, 16, 128, torch.bfloat16
    print(f"GPU: {torch.cuda.get_device_name()}, {tokens} tokens per batch (B·T), H {H}, head dim {D}, bf16, "
          f"torch {torch.__version__}; median of {a.repeats} fwd+bwd after {a.gpu_warmup} warm-up (CUDA events)")
    ours, fla = _ours_triton(), _fla_delta_rule()

    def flash(x: dict) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x["qa"], x["ka"], x["va"], is_causal=True)

    rows = []
    for T in a.gpu_lengths:
        B = max(1, tokens // T)
        x = make_inputs(B, T, H, D, dtype, "cuda")
        row = {"T": T, "B": B}
        for name, fn in (("ours", ours), ("fla", fla)):
            if fn is not None:
                log.info("T %d: %s", T, name)
                row[name] = cuda_fwd_bwd_ms(lambda fn=fn: fn(x["q"], x["k"], x["v"], x["beta"]), x["do"],
                                            lambda: _clear_grads(x), a.repeats, a.gpu_warmup)
        log.info("T %d: sdpa flash", T)
        row["sdpa"] = cuda_fwd_bwd_ms(lambda: flash(x), x["doa"], lambda: _clear_grads(x), a.repeats, a.gpu_warmup)
        rows.append(row)
        del x
        torch.cuda.empty_cache()

    base = "fla" if fla is not None else "sdpa"
    ms = lambda r, n: f"{r[n]:.3f}" if n in r else "n/a"  # noqa: E731
    ratio = lambda r, n: f"{r[n] / r[base]:.2f}" if n in r else "n/a"  # noqa: E731
    print(f"{'B x T':>10} {'ours ms':>9} {'fla ms':>9} {'sdpa ms':>9} {'ours/' + base:>11} {'sdpa/' + base:>11}")
    for r in rows:
        print(f"{str(r['B']) + ' x ' + str(r['T']):>10} {ms(r, 'ours'):>9} {ms(r, 'fla'):>9} {ms(r, 'sdpa'):>9} "
              f"{ratio(r, 'ours'):>11} {ratio(r, 'sdpa'):>11}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, choices=(16, 32, 64))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per point (chunked, attention; GPU: all)")
    ap.add_argument("--loop-repeats", type=int, default=3, help="timed runs per point for the token loop (slow)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (CPU)")
    ap.add_argument("--gpu", action="store_true", help="run the GPU comparison (Triton vs fla vs SDPA flash) instead")
    ap.add_argument("--gpu-lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--gpu-tokens", type=int, default=16384, help="B·T per batch on GPU")
    ap.add_argument("--gpu-warmup", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_gpu(a) if a.gpu else run_cpu(a)


if __name__ == "__main__":
    main()
