"""Compile every MoE dispatch Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts things the GPU compiler rejects (loop-carried tiles changing dtype or shape, shared
memory past the limit); compiling through triton's own ptxas catches those. bf16 activations and weights,
fp32 gates, int64 plan tensors, BM = 64, (d_in, d_out) = (1024, 128) and the reverse, with the tiles and
launch options triton_impl uses. Must run with TRITON_INTERPRET unset. Prints one line per kernel and shape:

    python ops_tests/kernels/moe_sm90_compile.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels.moe import triton_impl as ti  # noqa: E402
from kernels.moe import triton_kernels as tk  # noqa: E402
from sm90_compile import compile_for_sm90  # noqa: E402
SHAPES = ((1024, 128), (128, 1024))


def kernels(dtype: str, BM: int, d_in: int, d_out: int) -> list[tuple]:
    x, f32, i64 = f"*{dtype}", "*fp32", "*i64"
    plan = dict(tile_expert=i64, padded_offsets=i64, counts=i64, entry_off=i64, src=i64, order=i64, slot_row=i64)
    bd_in, bd_out = ti._bd(d_in), ti._bd(d_out)
    return [
        (tk.gather_kernel, dict(x=x, xs=x, **plan), dict(BM=BM, BD=bd_in)),
        (tk.fan_sum_kernel, dict(buf=x, out=x, gates=x, **plan), dict(GATED=False, BR=ti.BR, BD=bd_in)),
        (tk.grouped_mm_kernel, dict(a=x, w=x, c=x, **plan), dict(BM=BM, BN=ti.BN, BK=ti.BK)),
        (tk.grouped_mm_dw_kernel, dict(a=x, g=x, dw=x, **plan), dict(BM=BM, BK=ti.BK_DW, BN=ti.BN_DW)),
        (tk.fan_sum_kernel, dict(buf=x, out=x, gates=f32, **plan), dict(GATED=True, BR=ti.BR, BD=bd_out)),
        (tk.scatter_bwd_kernel, dict(ys=x, dy=x, gates=f32, dys=x, dgates=f32, **plan),
         dict(WANT_DYS=True, WANT_DGATES=True, BM=BM, BD=min(64, bd_out))),
    ]


def main(dtype: str = "bf16", BM: int = 64) -> int:
    failed = 0
    for d_in, d_out in SHAPES:
        for fn, types, consts in kernels(dtype, BM, d_in, d_out):
            name = f"{fn.__name__}[{d_in}x{d_out}{',gated' if consts.get('GATED') else ''}]"
            failed += not compile_for_sm90(fn, types, consts, ti._launch(), name)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
