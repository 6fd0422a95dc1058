"""Pure-torch weighted gather (the CPU path, and the GPU fallback): an autograd Function, two forward modes.

Forward "index": tables[idx] then the weighted sum over K; "embedding_bag": F.embedding_bag(mode="sum",
per_sample_weights=w). Both accumulate in fp32 for fp16/bf16 tables (float64 stays float64) and return
the tables' dtype. The backward is hand-written and shared: ∂w from the gathered rows · ∂y, and ∂T by a
sort-based segmented reduction (`GatherPlan`), never index_add_ / scatter_add / accumulate=True, which
sum through atomics on a GPU and so in a run-dependent order (spec §1: determinism where required).

On the CPU the backward never materialises the gathered rows [N, K, h] (≈20× slower there: memory, not
arithmetic): ∂T is the sparse product Sᵀ·∂y with S [N, R] holding w at (n, idx[n, k]), in CSR by table row —
the plan's sorted segments are its rows, each summed by one thread in entry order — and ∂w the sampled
product ⟨∂y[n], T[idx[n, k]]⟩ at S's entries (`torch.sparse.sampled_addmm`). Both deterministic.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TORCH_MODES = ("index", "embedding_bag")


@dataclass(frozen=True)
class GatherPlan:
    """Entries (n, k), flattened as m = n·K + k, grouped by the table row they read.

    Sorted position i holds entry order[i]; the entries of the j-th selected row rows[j] are the sorted
    positions offsets[j] .. offsets[j+1] − 1, in their original (stable) order, so every sum over a row's
    entries runs in one fixed order. Rows never selected have no segment.
    """
    order: torch.Tensor  # [M] int64: sorted position -> flat entry m (stable sort by row)
    rows: torch.Tensor  # [U] int64: the distinct selected rows, ascending
    offsets: torch.Tensor  # [U + 1] int64: first sorted position of each selected row, then M
    num_rows: int  # R: rows of the table the plan was made for

    @property
    def entries(self) -> int:
        return self.order.numel()

    @property
    def segments(self) -> int:
        return self.rows.numel()

    @property
    def counts(self) -> torch.Tensor:
        """[U] entries per selected row."""
        return self.offsets[1:] - self.offsets[:-1]


@torch.no_grad()
def make_gather_plan(idx: torch.Tensor, num_rows: int) -> GatherPlan:
    """The sort plan of `idx` (any shape, values in [0, num_rows)), computed once per index tensor.

    Q, K and V of a MemoryFormer block share their codes (spec §2), so one plan serves all three gathers.
    The number of distinct rows is data-dependent: building the plan syncs with the host once.
    """
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    flat = idx.reshape(-1).long()
    sorted_rows, order = torch.sort(flat, stable=True)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    if rows.numel() and bool((rows[0] < 0) | (rows[-1] >= num_rows)):
        raise ValueError(f"idx values span [{int(rows[0])}, {int(rows[-1])}], outside [0, {num_rows})")
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return GatherPlan(order=order, rows=rows, offsets=offsets, num_rows=num_rows)


def flatten_inputs(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten idx, w [..., K] to [N, K] (idx as int64)."""
    if tables.dim() != 2:
        raise ValueError(f"tables must be [R, h], got shape {tuple(tables.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be an integer tensor, got {idx.dtype}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating tensor, got {w.dtype}")
    if idx.dim() < 1 or idx.shape != w.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and w {tuple(w.shape)} must have the same shape [..., K]")
    K = idx.shape[-1]
    return idx.reshape(-1, K).long(), w.reshape(-1, K)


def check_plan(plan: GatherPlan, idx: torch.Tensor, num_rows: int) -> None:
    """A plan passed in by the caller must have been made for this idx and table size."""
    if plan.entries != idx.numel() or plan.num_rows != num_rows:
        raise ValueError(f"plan for {plan.entries} entries / {plan.num_rows} rows; "
                         f"idx has {idx.numel()} entries, the table {num_rows} rows")
    if plan.order.device != idx.device:
        raise ValueError(f"plan on {plan.order.device}, idx on {idx.device}")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle dtype); everything else sums in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    acc = accum_dtype(tables.dtype)
    if mode == "embedding_bag" and idx.numel():
        # embedding_bag wants weights of the table's dtype: run it on an fp32 copy of a half table.
        y = F.embedding_bag(idx, tables.to(acc), mode="sum", per_sample_weights=w.to(acc))
    else:
        y = (tables[idx].to(acc) * w.to(acc).unsqueeze(-1)).sum(-2)
    return y.to(tables.dtype)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def weight_grad(tables: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """∂w[n,k] = ⟨∂y[n], T[idx[n,k]]⟩ in the accumulation dtype (rows re-gathered, not saved: memory)."""
    acc = accum_dtype(tables.dtype)
    if tables.device.type == "cpu" and idx.numel():
        N, K = idx.shape
        cols, perm = torch.sort(idx, dim=1, stable=True)  # CSR wants each row's columns ascending
        crow = torch.arange(0, N * K + 1, K, device=idx.device)
        pattern = _csr(crow, cols.reshape(-1), torch.ones(N * K, dtype=acc), (N, tables.shape[0]))
        vals = torch.sparse.sampled_addmm(pattern, dy.to(acc), tables.to(acc).t(), beta=0.0).values()
        return torch.empty(N, K, dtype=acc).scatter_(1, perm, vals.view(N, K))
    return (tables[idx].to(acc) * dy.to(acc).unsqueeze(-2)).sum(-1)


def table_grad(dy: torch.Tensor, w: torch.Tensor, plan: GatherPlan, dtype: torch.dtype) -> torch.Tensor:
    """∂T[r] = Σ_{entries m on row r} w[m]·∂y[m // K] as a segmented sum in sorted order; zero elsewhere.

    dy [N, h], w [N, K]. segment_reduce sums each segment in one fixed order on CPU and GPU alike, and
    each selected row is then copied (not accumulated) into the zero table: one writer per row.
    """
    acc = accum_dtype(dtype)
    grad = dy.new_zeros(plan.num_rows, dy.shape[-1], dtype=dtype)
    if not plan.segments:
        return grad
    K = w.shape[-1]
    if dy.device.type == "cpu":
        crow = torch.zeros(plan.num_rows + 1, dtype=torch.int64)
        crow[plan.rows + 1] = plan.counts
        s_t = _csr(crow.cumsum(0), plan.order // K, w.reshape(-1)[plan.order].to(acc), (plan.num_rows, dy.shape[0]))
        return (s_t @ dy.to(acc)).to(dtype)
    contrib = w.reshape(-1)[plan.order].to(acc).unsqueeze(-1) * dy.to(acc)[plan.order // K]
    sums = torch.segment_reduce(contrib, "sum", lengths=plan.counts, axis=0)
    return grad.index_copy_(0, plan.rows, sums.to(dtype))


class _TorchGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, plan: GatherPlan | None,  # noqa: ANN001
                mode: str) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(tables, idx, w)
        return _forward(tables, idx, w, mode)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # noqa: ANN001, ANN205
        tables, idx, w = ctx.saved_tensors
        dT = dw = None
        if ctx.needs_input_grad[0]:
            plan = ctx.plan or make_gather_plan(idx, tables.shape[0])
            dT = table_grad(dy, w, plan, tables.dtype)
        if ctx.needs_input_grad[2]:
            dw = weight_grad(tables, idx, dy).to(w.dtype)
        return dT, None, dw, None, None


def weighted_gather_torch(tables: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, mode: str = "index",
                          plan: GatherPlan | None = None) -> torch.Tensor:
    """y[...] = Σ_k w[..., k] · tables[idx[..., k]]: tables [R, h], idx / w [..., K] -> [..., h] (tables' dtype).

    ∂tables comes back in the tables' dtype, ∂w in w's. `plan`: a `make_gather_plan(idx, R)` to reuse.
    """
    if mode not in TORCH_MODES:
        raise ValueError(f"torch weighted_gather mode {mode!r}; allowed: {', '.join(TORCH_MODES)}")
    flat_idx, flat_w = flatten_inputs(tables, idx, w)
    if plan is not None:
        check_plan(plan, flat_idx, tables.shape[0])
    y = _TorchGather.apply(tables, flat_idx, flat_w, plan, mode)
    return y.reshape(*idx.shape[:-1], tables.shape[-1])
