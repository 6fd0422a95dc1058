"""MemoryFormer's weighted table gather: y[n] = Σ_k w[n,k] · T[idx[n,k]] over K rows of one flat table
[K·2^τ, h], with ∂w[n,k] = ⟨∂y[n], T[idx[n,k]]⟩ and ∂T the deterministic (sorted, segmented, atomic-free)
sum of w·∂y per selected row. Reference loop (`reference`), pure-torch path with "index" and
"embedding_bag" forwards (`torch_impl`), Triton path (`triton_impl`).
Spec: ../shared/specs/memoryformer.md §1 "Weighted gather"."""
from kernels.hashed_gather.dispatch import GATHER_BACKENDS, weighted_gather
from kernels.hashed_gather.reference import weighted_gather_reference
from kernels.hashed_gather.torch_impl import GatherPlan, make_gather_plan

__all__ = ["GATHER_BACKENDS", "GatherPlan", "make_gather_plan", "weighted_gather", "weighted_gather_reference"]
