"""The public dispatch functions: each picks the Triton or the pure-torch path for one primitive."""
from __future__ import annotations

import torch

from kernels.backend import BACKENDS
from kernels.backend import pick_backend as _pick
from kernels.moe.plan import RoutingPlan, make_plan
from kernels.moe.torch_impl import gather_torch, grouped_mm_torch, scatter_torch

# "megablocks": the real package for the whole expert MLP where it installs (comparison only; never "auto").
MOE_BACKENDS = (*BACKENDS, "megablocks")


def primitive_backend(backend: str) -> str:
    """The backend for our own primitives when `backend` names a whole-MLP implementation they cannot be."""
    return "auto" if backend == "megablocks" else backend


def pick_backend(x: torch.Tensor, backend: str) -> str:
    return _pick(x, backend, "moe dispatch")


def default_block(x: torch.Tensor) -> int:
    """Rows per tile: 64 on a GPU (spec §3.2); 1 on CPU, where the torch path loops over exact segments
    and padding would only cost memory."""
    return 64 if x.is_cuda else 1


def gather(x: torch.Tensor, plan: RoutingPlan, backend: str = "auto") -> torch.Tensor:
    """x [N_in, d] -> xs [plan.rows, d]: xs[dst[i]] = x[src[i]], padding rows zero."""
    if pick_backend(x, backend) == "triton":
        from kernels.moe.triton_impl import gather_triton  # imports triton: only when asked

        return gather_triton(x, plan)
    return gather_torch(x, plan)


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, backend: str = "auto") -> torch.Tensor:
    """xs [plan.rows, d_in], w [E, d_in, d_out] -> ys [plan.rows, d_out]: each expert's rows times its matrix."""
    if pick_backend(xs, backend) == "triton":
        from kernels.moe.triton_impl import grouped_mm_triton

        return grouped_mm_triton(xs, w, plan)
    return grouped_mm_torch(xs, w, plan)


def scatter(ys: torch.Tensor, plan: RoutingPlan, gates: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """ys [plan.rows, d], gates (F entries in slot order) -> y [plan.n_out, d] = Σ_{slots of a row} gate · ys[row]."""
    if pick_backend(ys, backend) == "triton":
        from kernels.moe.triton_impl import scatter_triton

        return scatter_triton(ys, plan, gates)
    return scatter_torch(ys, plan, gates)


def expert_mlp(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor,
               w_out: torch.Tensor | None = None, *, fan_in: int, fan_out: int, block: int | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Dropless mixture: y[f // fan_out] += gates[f] · (relu(x[f // fan_in] @ w_in[e]) @ w_out[e]), e = expert_ids[f].

    Without `w_out` one expert matrix and no activation (SwitchHead's V and O projections). x [N_in, d];
    expert_ids, gates: F = N_in·fan_in entries in slot order. Returns [F // fan_out, d_out].
    """
    if backend == "megablocks":
        if fan_in != fan_out:
            raise ValueError(f"the megablocks backend covers fan_in == fan_out (each row to its k experts and back); "
                             f"got fan_in={fan_in}, fan_out={fan_out}")
        from kernels.moe.megablocks_impl import expert_mlp_megablocks

        return expert_mlp_megablocks(x, expert_ids.reshape(-1, fan_in), gates, w_in, w_out)
    plan = make_plan(expert_ids, w_in.shape[0], fan_in=fan_in, fan_out=fan_out,
                     block=block or default_block(x))
    h = grouped_mm(gather(x, plan, backend), w_in, plan, backend)
    if w_out is not None:
        h = grouped_mm(torch.relu(h), w_out, plan, backend)
    return scatter(h, plan, gates, backend)
