"""The expert MLP through the real `megablocks` package, for comparison with our own paths.

megablocks (with its CUTLASS `grouped_gemm` dependency) installs only on CUDA machines; it is selected by
`moe_backend: megablocks` and never picked automatically. It covers one mapping: every input row sent to its
k experts and summed back (fan_in = fan_out = k, the σ-MoE); SwitchHead's per-head mappings stay on our kernels.
Unlike our plan it syncs with the host twice per call (the grouped GEMM takes per-expert counts on the CPU).
"""
from __future__ import annotations

import math

import torch


def megablocks_missing() -> str | None:
    """Why the megablocks backend cannot run here, or None when it can."""
    try:
        from megablocks import grouped_gemm_util as gg
        from megablocks import ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an import of a CUDA extension can fail in many ways
        return f"megablocks does not import ({type(e).__name__}: {e})"
    if gg.ops is None:
        return "megablocks imports but its grouped_gemm dependency does not"
    return None


def expert_mlp_megablocks(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor,
                          w_out: torch.Tensor | None) -> torch.Tensor:
    """Same contract as `kernels.moe.expert_mlp` with fan_in = fan_out = expert_ids.shape[-1]:
    y[n] = Σ_j gates[n, j] · (relu(x[n] @ w_in[e]) @ w_out[e]), e = expert_ids[n, j] (no ReLU without w_out)."""
    from megablocks import grouped_gemm_util as gg
    from megablocks import ops

    num_experts, top_k = w_in.shape[0], expert_ids.shape[-1]
    flat = expert_ids.reshape(-1).int()
    with torch.no_grad():
        # megablocks' radix sort over the bits an expert id can use; `indices` are slots f in expert order.
        bin_ids, indices = ops.sort(flat, max(math.ceil(math.log2(num_experts)), 1))
        counts = ops.histogram(flat, num_experts)
        bins = ops.inclusive_cumsum(counts, 0).view(-1)
    xs = ops.gather(x.contiguous(), indices, bin_ids, bins, top_k)
    sizes = counts.to("cpu", torch.int64)
    h = gg.ops.gmm(xs, w_in.to(xs.dtype), sizes, trans_b=False)
    if w_out is not None:
        h = gg.ops.gmm(torch.relu(h), w_out.to(xs.dtype), sizes, trans_b=False)
    return ops.scatter(h, indices, bin_ids, gates.reshape(-1).to(h.dtype), bins, top_k)
