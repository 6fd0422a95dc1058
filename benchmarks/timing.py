"""Timing shared by the GPU benchmarks."""
from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_fwd_bwd_ms(fn: Callable[[], torch.Tensor], grad: torch.Tensor, reset: Callable[[], None], repeats: int,
                    warmup: int) -> float:
    """Median forward+backward time (ms) of `fn().backward(grad)` with CUDA events; `reset` clears the
    gradients before each run; the warm-up covers Triton compilation and autotuning."""
    times = []
    for i in range(warmup + repeats):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn().backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)
