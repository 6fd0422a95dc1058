"""The delta rule (DeltaNet, Gated DeltaNet): token-loop oracle and chunked pure-torch path; the Triton
path lands behind the same function (spec: ../shared/specs/deltanet.md)."""
from kernels.delta_rule.reference import delta_rule_recurrent
from kernels.delta_rule.torch_impl import chunk_delta_rule_torch

__all__ = ["chunk_delta_rule_torch", "delta_rule_recurrent"]
