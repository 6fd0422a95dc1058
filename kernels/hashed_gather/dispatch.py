"""The public weighted gather: picks the Triton kernels or one of the two pure-torch forwards."""
from __future__ import annotations

import torch

from kernels.backend import pick_backend
from kernels.hashed_gather.torch_impl import GatherPlan, weighted_gather_torch

# "index" / "embedding_bag": the pure-torch forwards (same hand-written backward); "auto" as for every op.
GATHER_BACKENDS = ("auto", "index", "embedding_bag", "triton")


def pick_gather_backend(tables: torch.Tensor, backend: str) -> str:
    """The concrete backend: "auto" is Triton for CUDA tables that are not float64 when triton imports
    (kernels.backend's rule), else "embedding_bag" (one fused kernel: "index" materialises the gathered
    rows [N, K, h], ≈30× slower on a CPU)."""
    if backend not in GATHER_BACKENDS:
        raise ValueError(f"weighted_gather backend {backend!r}; allowed: {', '.join(GATHER_BACKENDS)}")
    if backend != "auto":
        return backend
    return "triton" if pick_backend(tables, "auto", "weighted_gather") == "triton" else "embedding_bag"


def weighted_gather(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, backend: str = "auto", *,
                    plan: GatherPlan | None = None) -> torch.Tensor:
    """y[..., :] = Σ_k w[..., k] · tables[idx[..., k]] (spec memoryformer.md §1, "Weighted gather").

    tables [R, h] (R = K·2^τ, flat); idx [..., K] integer in [0, R), table offsets k·2^τ already added;
    w [..., K] float. Returns [..., h] in the tables' dtype; ∂tables comes back in the tables' dtype (zero
    on rows never selected), ∂w in w's. The table gradient is a deterministic sorted segmented sum on
    every backend. `plan`: `make_gather_plan(idx, R)`, to share one sort between gathers with the same idx.
    """
    chosen = pick_gather_backend(tables, backend)
    if chosen == "triton":
        from kernels.hashed_gather.triton_impl import weighted_gather_triton  # imports triton: only when asked

        return weighted_gather_triton(tables, idx, w, plan)
    return weighted_gather_torch(tables, idx, w, chosen, plan)
