"""AdamW that refuses a non-finite update: the skip_step half of `fault.nonfinite`.

DeepSpeed's ZeRO 1/2 optimizer already skips a step whose gradient norm is not finite (its
`overflow` flag) and reports the norm. Without ZeRO the engine calls the optimizer directly, so
a NaN gradient would reach the weights and Adam's moments, and no norm is reported. For that
case this optimizer clips itself (`max_norm`; DeepSpeed's own clipping is then turned off),
records `_global_grad_norm`, and raises the same `overflow` flag on a non-finite gradient
(agreed over the process group: every rank must skip together), which the engine reads to
skip the LR-schedule step as well.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FiniteAdamW(torch.optim.AdamW):
    def __init__(self, params, *, max_norm: float = 0.0, tp_group=None, pp_group=None, ep_group=None,  # noqa: ANN001
                 **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.tp_group, self.pp_group, self.ep_group = max_norm, tp_group, pp_group, ep_group
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return super().step(closure)
        grads = [p.grad for p in params]
        # A TP-sharded parameter's squares are summed over the TP group; a replicated one counts once.
        # An expert shard's squares are summed over the ep group (each rank holds different experts).
        sharded = torch.zeros(1, device=grads[0].device)
        replicated = torch.zeros(1, device=grads[0].device)
        experts = torch.zeros(1, device=grads[0].device)
        for p in params:
            if getattr(p, "ds_pipe_replicated", False):
                continue  # a tied weight's copy on a later pipeline stage: its first stage counts it
            if getattr(p, "allreduce", True) is False:
                acc = experts
            else:
                acc = sharded if getattr(p, "tensor_model_parallel", False) else replicated
            acc += p.grad.float().pow(2).sum()
        if self.tp_group is not None:
            dist.all_reduce(sharded, group=self.tp_group)
        if self.ep_group is not None:
            dist.all_reduce(experts, group=self.ep_group)
        sq = sharded + replicated + experts
        if self.pp_group is not None:
            dist.all_reduce(sq, group=self.pp_group)  # each stage holds different parameters
        if dist.is_initialized():
            # Gradients are already reduced over data parallel; MAX makes every rank agree on a NaN.
            dist.all_reduce(sq, op=dist.ReduceOp.MAX)
        norm = sq.sqrt().item()
        self._global_grad_norm = norm
        self.overflow = not torch.isfinite(sq).item()
        if self.overflow:
            return None
        if self.max_norm > 0:
            coef = self.max_norm / (norm + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)
        return super().step(closure)
