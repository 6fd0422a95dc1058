"""Which implementation of a kernel runs: the Triton path on a GPU, pure torch otherwise."""
from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(x: torch.Tensor, backend: str, op: str) -> str:
    """"torch" or "triton" for `backend` ("auto": Triton for a CUDA tensor when triton imports)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op} backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    # float64 is the oracles' dtype: the Triton kernels run fp32/fp16/bf16 only.
    if x.is_cuda and x.dtype != torch.float64 and triton_available():
        return "triton"
    return "torch"
