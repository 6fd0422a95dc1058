"""Compile every delta-rule Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as numpy and accepts things the GPU compiler rejects (a loop-carried
tile that changes shape, shared memory past the limit); compiling through triton's own ptxas for
the default 1.3B shape (bf16, K = V = 128, chunk 64) catches those. Must run with TRITON_INTERPRET
unset (the kernels are then real JIT functions). Prints one line per kernel with its shared memory.

    python ops_tests/kernels/sm90_compile.py
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.delta_rule import triton_bwd as bwd  # noqa: E402
from kernels.delta_rule import triton_fwd as fwd  # noqa: E402
from kernels.delta_rule.triton_impl import _blocks, _launch  # noqa: E402

H100_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90


def kernels(dtype: str, C: int, BK: int, BV: int) -> list[tuple]:
    x, f32 = f"*{dtype}", "*fp32"
    meta = dict(info="*i32", cu="*i32", coff="*i32", scale="fp32")
    on = dict(GATED=True)
    return [
        (fwd.kkt_solve_kernel, dict(k=x, beta=x, g=f32, ai=x), dict(C=C, BK=BK, **on)),
        (fwd.wu_kernel, dict(k=x, v=x, beta=x, g=f32, ai=x, w=x, u=x), dict(C=C, BK=BK, BV=BV, **on)),
        (fwd.state_scan_kernel, dict(k=x, w=x, u=x, g=f32, h0=f32, states=x, vnew=x, ht=f32),
         dict(C=C, BK=BK, BV=BV, HAS_H0=True, STORE_FINAL=True, **on)),
        (fwd.output_kernel, dict(q=x, k=x, g=f32, states=x, vnew=x, o=x), dict(C=C, BK=BK, BV=BV, **on)),
        (bwd.dv_local_kernel, dict(q=x, k=x, g=f32, do=x, dvl=f32), dict(C=C, BK=BK, BV=BV, **on)),
        (bwd.state_grad_scan_kernel, dict(q=x, k=x, w=x, g=f32, do=x, dvl=f32, dht=f32, dstates=f32, dv2=f32, dh0=f32),
         dict(C=C, BK=BK, BV=BV, HAS_DHT=True, STORE_DH0=True, **on)),
        (bwd.dqkw_kernel, dict(q=x, k=x, g=f32, states=x, vnew=x, dstates=f32, dv2=f32, do=x, dq=f32, dk=f32, dw=f32,
                               dgam=f32), dict(C=C, BK=BK, BV=BV, **on)),
        (bwd.wy_bwd_kernel, dict(k=x, v=x, beta=x, g=f32, ai=x, dv2=f32, dw=f32, dk=f32, dv=f32, dbeta=f32, dgam=f32,
                                 dg=f32), dict(C=C, BK=BK, BV=BV, **on)),
    ], meta


def compile_for_sm90(fn, types: dict[str, str], consts: dict, options: dict, name: str | None = None) -> bool:  # noqa: ANN001
    """Compile one JIT kernel for sm_90 (`types`: pointer/scalar types by argument, others i32; `consts`:
    constexpr values); prints "OK|FAIL <name> shared=<bytes>" and returns whether it compiled within an H100's
    shared memory."""
    name = name or fn.__name__
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
        return False
    shared = compiled.metadata.shared
    ok = shared <= H100_SHARED
    print(f"{'OK' if ok else 'FAIL'} {name} shared={shared}")
    return ok


def _compile_one(index: int, dtype: str, K: int, V: int, C: int) -> bool:
    BK, BV = _blocks(K, V)
    jobs, meta = kernels(dtype, C, BK, BV)
    fn, ptrs, consts = jobs[index]
    return compile_for_sm90(fn, {**meta, **ptrs}, consts, _launch(K))


def main(dtype: str = "bf16", K: int = 128, V: int = 128, C: int = 64) -> int:
    """Compiles the kernels over the machine's cores (each compile is single-threaded); returns the failures."""
    count = len(kernels(dtype, C, *_blocks(K, V))[0])
    # fork: the children inherit the imported kernels (JIT functions are not picklable by reference alone)
    with ProcessPoolExecutor(max_workers=min(count, os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, range(count), *zip(*[(dtype, K, V, C)] * count)))
    return sum(not ok for ok in results)


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
