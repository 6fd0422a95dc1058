"""Compile every weighted-gather Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts things the GPU compiler rejects (loop-carried tiles changing dtype or shape, shared
memory past the limit); compiling through triton's own ptxas catches those. bf16 tables and activations,
fp32 weights, int64 idx and plan tensors, K = 64 tables, h ∈ {512, 2048} (MF-tiny's ML2 and a wide layer),
with the tiles and launch options triton_impl uses. Must run with TRITON_INTERPRET unset. Prints one line
per kernel and shape:

    python ops_tests/kernels/hashed_gather_sm90_compile.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels.hashed_gather import triton_impl as ti  # noqa: E402
from kernels.hashed_gather import triton_kernels as tk  # noqa: E402
from sm90_compile import compile_for_sm90  # noqa: E402

WIDTHS = (512, 2048)
K = 64  # passed at run time; listed so the report says which shape was meant


def kernels(dtype: str, h: int) -> list[tuple]:
    x, f32, i64 = f"*{dtype}", "*fp32", "*i64"
    bh = ti._bh(h)
    return [
        (tk.gather_fwd_kernel, dict(tables=x, idx=i64, w=f32, y=x), dict(BN=ti.BN, BH=bh)),
        (tk.gather_dw_kernel, dict(tables=x, idx=i64, dy=x, dw=f32), dict(BM=ti.BM, BH=bh)),
        (tk.gather_dtable_kernel, dict(dy=x, w=f32, order=i64, rows=i64, offsets=i64, dtables=x),
         dict(BS=ti.BS, BH=bh)),
    ]


def main(dtype: str = "bf16") -> int:
    failed = 0
    for h in WIDTHS:
        for fn, types, consts in kernels(dtype, h):
            failed += not compile_for_sm90(fn, types, consts, ti._launch(), f"{fn.__name__}[h={h},K={K}]")
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
