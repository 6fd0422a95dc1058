"""Forward+backward time of the dropless MoE dispatch (`kernels.moe.expert_mlp`) vs the naive per-token loop
vs a dense MLP of the same FLOPs.

CPU (default): the σ-MoE feed-forward of MoEUT 44M (d 412, E 155, es 128, k 12; fp32) at N tokens, and of
MoEUT 244M (d 1024, E 387, k 16) at one N. Routing: sigmoid of random router logits, top-k (sorted=True),
gates = the chosen sigmoid values (a leaf: they get a gradient). Methods, run round-robin in this process:
dropless = `expert_mlp(..., backend="torch")` with the CPU default block 1 (and block 64); dense =
relu(x @ W1[d, k·es]) @ W2[k·es, d], the same FLOPs per token; loop = `expert_mix_reference`, the
per-(token, choice) oracle, timed only at a small N (it is slow) and compared per token with dropless at
that N (at 244M only with --big-loop-tokens: its backward writes a full-size [E, d, es] gradient per
assignment, ~8 s per call at N 2). Gradients w.r.t. x, gates, w_in, w_out (dense: x, W1, W2). Median of
repeats after a warm-up.

GPU (`--gpu`, needs CUDA): MoEUT 244M shapes, 8×1024 tokens, bf16, TF32 off, CUDA-event timing: our Triton
path (`backend="triton"`) vs the dense matmul of equal FLOPs (throughput fraction dense / moe, goal ≥ 0.9,
spec moeut.md §7.8), the torch path on the GPU, and megablocks `dMoE` (grouped / sparse) where it imports.

    python benchmarks/moe_dispatch.py [--tokens 256 1024 4096] [--loop-tokens 64] [--threads 2]
    python benchmarks/moe_dispatch.py --gpu
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.timing import cuda_fwd_bwd_ms  # noqa: E402
from kernels.moe import expert_mix_reference, expert_mlp  # noqa: E402

log = logging.getLogger("benchmarks.moe_dispatch")

SHAPES = {"44M": {"d": 412, "E": 155, "k": 12, "es": 128}, "244M": {"d": 1024, "E": 387, "k": 16, "es": 128}}
Method = tuple[Callable[[], torch.Tensor], torch.Tensor]


def make_inputs(N: int, d: int, E: int, k: int, es: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Routing (ids [N,k], gates [N,k]), expert weights, dense weights of equal FLOPs, output gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    vals, ids = torch.randn(N, E, generator=g).sigmoid().topk(k, dim=-1, sorted=True)
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return {"x": leaf(rnd(N, d)), "gates": leaf(vals), "ids": ids.to(device),
            "w_in": leaf(rnd(E, d, es, scale=d ** -0.5)), "w_out": leaf(rnd(E, es, d, scale=es ** -0.5)),
            "W1": leaf(rnd(d, k * es, scale=d ** -0.5)), "W2": leaf(rnd(k * es, d, scale=(k * es) ** -0.5)),
            "dy": rnd(N, d).to(device=device, dtype=dtype), "k": k}


def _clear_grads(x: dict) -> None:
    for t in x.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def methods(x: dict, loop: bool, block64: bool, backend: str = "torch", block: int | None = None) -> dict[str, Method]:
    k = x["k"]
    moe = lambda block=block: expert_mlp(x["x"], x["ids"], x["gates"], x["w_in"], x["w_out"],  # noqa: E731
                                        fan_in=k, fan_out=k, block=block, backend=backend)
    out: dict[str, Method] = {"dropless": (moe, x["dy"]),
                              "dense": (lambda: torch.relu(x["x"] @ x["W1"]) @ x["W2"], x["dy"])}
    if block64:
        out["dropless_b64"] = (lambda: moe(64), x["dy"])
    if loop:
        out["loop"] = (lambda: expert_mix_reference(x["x"], x["ids"], x["gates"], [x["w_in"], x["w_out"]],
                                                    fan_in=k, fan_out=k), x["dy"])
    return out


# ---------------------------------------------------------------------------------------------- CPU


def cpu_time_interleaved(ms: dict[str, Method], x: dict, repeats: dict[str, int], warmup: int) -> dict[str, float]:
    """Median fwd+bwd wall time (s) per method; methods run round-robin so background load hits all alike."""
    def once(fwd: Callable[[], torch.Tensor], grad: torch.Tensor) -> float:
        _clear_grads(x)
        t0 = time.perf_counter()
        fwd().backward(grad)
        return time.perf_counter() - t0

    for fwd, grad in ms.values():
        for _ in range(warmup):
            once(fwd, grad)
    runs: dict[str, list[float]] = {name: [] for name in ms}
    for r in range(max(repeats[n] for n in ms)):
        for name, (fwd, grad) in ms.items():
            if r < repeats[name]:
                runs[name].append(once(fwd, grad))
    return {name: statistics.median(ts) for name, ts in runs.items()}


def run_cpu(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    print(f"CPU: fp32, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores), torch {torch.__version__}; "
          f"median of {a.repeats} fwd+bwd (loop: {a.loop_repeats}) after {a.warmup} warm-up, round-robin")
    points = [("44M", n, n == a.loop_tokens) for n in sorted({a.loop_tokens, *a.tokens})]
    if a.big_tokens:
        points += [("244M", a.big_tokens, a.big_tokens == a.big_loop_tokens)]
        if a.big_loop_tokens and a.big_loop_tokens != a.big_tokens:
            points.insert(-1, ("244M", a.big_loop_tokens, True))
    rows = []
    for model, N, loop in points:
        s = SHAPES[model]
        x = make_inputs(N, s["d"], s["E"], s["k"], s["es"], torch.float32, "cpu")
        ms = methods(x, loop, a.block64)
        if loop:  # the three paths compute the same mixture
            with torch.no_grad():
                err = (ms["dropless"][0]() - ms["loop"][0]()).abs().max().item()
            log.info("%s N %d: max |dropless - loop| = %.1e", model, N, err)
        log.info("%s N %d: timing %s", model, N, ", ".join(ms))
        t = cpu_time_interleaved(ms, x, {n: a.loop_repeats if n == "loop" else a.repeats for n in ms}, a.warmup)
        rows.append({"model": model, "N": N, **t})
        del x, ms

    f = lambda r, n, p=4: f"{r[n]:.{p}f}" if n in r else "–"  # noqa: E731
    print(f"{'model':>5} {'N':>5} {'dropless s':>11} {'block64 s':>10} {'dense s':>9} {'dropless/dense':>15} "
          f"{'loop s':>8} {'loop ms/tok':>12} {'dropless ms/tok':>16} {'loop/dropless':>14}")
    for r in rows:
        per = lambda n: f"{1e3 * r[n] / r['N']:.3f}" if n in r else "–"  # noqa: E731
        lr = f"{r['loop'] / r['dropless']:.0f}" if "loop" in r else "–"
        print(f"{r['model']:>5} {r['N']:>5} {f(r, 'dropless'):>11} {f(r, 'dropless_b64'):>10} {f(r, 'dense'):>9} "
              f"{r['dropless'] / r['dense']:>15.2f} {f(r, 'loop', 3):>8} {per('loop'):>12} {per('dropless'):>16} {lr:>14}")
    print(json.dumps({"device": "cpu", "rows": [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                                                 for r in rows]}))


# ---------------------------------------------------------------------------------------------- GPU


def megablocks_dmoe(impl: str, N: int, s: dict, repeats: int, warmup: int) -> float | str:
    """fwd+bwd ms of megablocks dMoE (relu MLP experts, bf16, no bias), or why it could not run."""
    try:
        from megablocks.layers import moe as mb_moe
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        want = dict(hidden_size=s["d"], ffn_hidden_size=s["es"], moe_num_experts=s["E"], moe_top_k=s["k"],
                    mlp_type="mlp", mlp_impl=impl, activation_fn=torch.relu, bias=False, return_bias=False,
                    moe_loss_weight=0.0, bf16=True, fp16=False, device=torch.device("cuda"))
        fields = {f.name for f in dataclasses.fields(Arguments)}
        layer = dMoE(Arguments(**{k: v for k, v in want.items() if k in fields})).cuda().to(torch.bfloat16)
        x = torch.randn(1024, N // 1024, s["d"], device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def fwd() -> torch.Tensor:
            out = layer(x)
            return out[0] if isinstance(out, tuple) else out

        def reset() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            mb_moe.clear_load_balancing_loss()

        return cuda_fwd_bwd_ms(fwd, torch.randn_like(x), reset, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - any failure (import, grouped_gemm/stk missing, kernel error) is a skip
        return f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_gpu(a: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    s, N = SHAPES["244M"], a.gpu_tokens
    flops = 12 * N * s["d"] * s["k"] * s["es"]  # fwd 2 matmuls (2·2·d·k·es per token), bwd twice that
    print(f"GPU: {torch.cuda.get_device_name()}, MoEUT 244M σ-MoE (d {s['d']}, E {s['E']}, k {s['k']}, es {s['es']}), "
          f"{N} tokens, bf16, TF32 off, torch {torch.__version__}; median of {a.gpu_repeats} fwd+bwd after "
          f"{a.gpu_warmup} warm-up (CUDA events); {flops / 1e9:.1f} GFLOP per fwd+bwd")
    x = make_inputs(N, s["d"], s["E"], s["k"], s["es"], torch.bfloat16, "cuda")
    reset = lambda: _clear_grads(x)  # noqa: E731
    res: dict[str, float | str] = {}
    try:
        import kernels.moe.triton_impl  # noqa: F401 - presence check only
        ms = methods(x, loop=False, block64=False, backend="triton", block=a.gpu_block)
        with torch.no_grad():
            ref = methods(x, loop=False, block64=False, backend="torch")["dropless"][0]()
            log.info("max |triton - torch path| = %.2e (bf16)", (ms["dropless"][0]() - ref).abs().max().item())
        res["triton"] = cuda_fwd_bwd_ms(*ms["dropless"], reset, a.gpu_repeats, a.gpu_warmup)
    except ImportError as e:
        res["triton"] = f"skipped: {e}"
    torch_ms = methods(x, loop=False, block64=False, backend="torch")
    res["torch path"] = cuda_fwd_bwd_ms(*torch_ms["dropless"], reset, a.gpu_repeats, a.gpu_warmup)
    res["dense"] = cuda_fwd_bwd_ms(*torch_ms["dense"], reset, a.gpu_repeats, a.gpu_warmup)
    del x
    torch.cuda.empty_cache()
    for impl in ("grouped", "sparse"):
        log.info("megablocks dMoE (%s)", impl)
        res[f"megablocks {impl}"] = megablocks_dmoe(impl, N, s, a.gpu_repeats, a.gpu_warmup)

    print(f"{'method':>20} {'ms':>9} {'TFLOP/s':>8} {'dense/method':>13}")
    for name, t in res.items():
        if isinstance(t, str):
            print(f"{name:>20} {t}")
        else:
            print(f"{name:>20} {t:>9.3f} {flops / t / 1e9:>8.1f} {res['dense'] / t:>13.2f}")
    if isinstance(res.get("triton"), float):
        frac = res["dense"] / res["triton"]
        print(f"Triton throughput fraction of dense: {frac:.2f} (goal >= 0.9: {'met' if frac >= 0.9 else 'NOT met'})")
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens": N, "ms": res}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="N at MoEUT 44M shapes")
    ap.add_argument("--loop-tokens", type=int, default=64, help="N at 44M where the per-token loop is timed")
    ap.add_argument("--big-tokens", type=int, default=1024, help="N at MoEUT 244M shapes (0: skip 244M)")
    ap.add_argument("--big-loop-tokens", type=int, default=0,
                    help="N at 244M where the per-token loop is timed (0: not timed; ~8 s per call already at N 2)")
    ap.add_argument("--no-block64", dest="block64", action="store_false", help="skip the block-64 dropless column")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (CPU)")
    ap.add_argument("--gpu", action="store_true", help="run the GPU comparison (Triton vs dense vs megablocks)")
    ap.add_argument("--gpu-tokens", type=int, default=8 * 1024, help="tokens per batch on GPU (a multiple of 1024)")
    ap.add_argument("--gpu-block", type=int, default=None, help="Triton tile rows (default: default_block, 64)")
    ap.add_argument("--gpu-repeats", type=int, default=20)
    ap.add_argument("--gpu-warmup", type=int, default=5)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_gpu(a) if a.gpu else run_cpu(a)


if __name__ == "__main__":
    main()
