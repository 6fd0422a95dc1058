"""The delta rule (DeltaNet, Gated DeltaNet) behind one function, `chunk_delta_rule`: token-loop oracle
(`reference`), chunked pure-torch path (`torch_impl`), Triton path (`triton_impl`).
Spec: ../shared/specs/deltanet.md."""
from kernels.delta_rule.dispatch import chunk_delta_rule
from kernels.delta_rule.reference import delta_rule_recurrent
from kernels.delta_rule.torch_impl import chunk_delta_rule_torch

__all__ = ["chunk_delta_rule", "chunk_delta_rule_torch", "delta_rule_recurrent"]
