"""Dropless mixture-of-experts dispatch (megablocks-style): a routing plan from integer ops, then gather
into expert order, grouped matmul over variable-size expert segments, weighted scatter back. Reference
token loop (`reference`), pure-torch path (`torch_impl`), Triton path (`triton_impl`).
Spec: ../shared/specs/moeut.md §3."""
from kernels.moe.dispatch import expert_mlp, gather, grouped_mm, scatter
from kernels.moe.plan import RoutingPlan, make_plan
from kernels.moe.reference import expert_mix_reference

__all__ = ["RoutingPlan", "expert_mix_reference", "expert_mlp", "gather", "grouped_mm", "make_plan", "scatter"]
