"""The protocols by which `parallel/` swaps a model's cores, and the base class that gives a sequence
core its single-device hooks. Pure single-device code: no process group is touched here.

parallel/ recognises a core by what it can do, not by its class (STYLE.md: protocols over classes):

- A **context-parallel core** mixes a sequence by a linear recurrence whose effect on a slice of tokens
  is an affine map of the state, so a rank can summarise its slice and fold earlier ranks' summaries
  into its initial state (the delta rule's K×K transition; a diagonal recurrence such as Mamba's).
- An **expert bank** holds E experts whose parameters are stacked on dim 0 and can run rows already
  grouped by expert through them (megablocks' local compute), so expert parallelism can exchange rows
  and call it on the experts this rank holds.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

Inputs = tuple[torch.Tensor | None, ...]


@runtime_checkable
class ContextParallelCore(Protocol):
    """A sequence-mixing core whose forward calls `left_context` (for rows before its tokens) and
    `recurrence` (for the scan); `SequenceCore` gives both their one-device meaning.

    Inputs are tensors with time on dim 1 (None allowed for an optional input). Under context
    parallelism `recurrence` becomes: `summarize` the slice from where its last sequence starts (the
    state-out as an affine function of the state-in, in fp32), all-gather, `fold` the summaries of the
    ranks before this one (in rank order) into a state, then `scan` from it.
    """

    halo: int  # rows of left context its forward reads (a short conv of width W: W − 1)

    def left_context(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def recurrence(self, inputs: Inputs, cu_seqlens: torch.Tensor | None) -> torch.Tensor: ...

    def scan(self, inputs: Inputs, initial_state: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None) -> torch.Tensor: ...

    def summarize(self, inputs: Inputs) -> torch.Tensor: ...

    def zero_summary(self, inputs: Inputs) -> torch.Tensor: ...

    def fold(self, summary: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor: ...


class SequenceCore(nn.Module):
    """Base of a context-parallel core: on one device there is no left context and the recurrence
    starts from zero. Subclasses implement `scan`, `summarize`, `zero_summary`, `fold` and set `halo`."""

    halo: int = 0

    def left_context(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows before each x, concatenated on channels [B, halo, ΣC]; their sequence ids): none on one device."""
        return None, None

    def recurrence(self, inputs: Inputs, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        return self.scan(inputs, None, cu_seqlens)


@runtime_checkable
class ExpertBank(Protocol):
    """E experts with parameters stacked on dim 0. `forward(x, expert_ids, gates)` is the routed, gated
    mixture; `expert_forward(rows, expert_ids)` runs each row through its one expert (ids index this
    module's experts, ungated) — the local compute expert parallelism calls on received rows."""

    def expert_parameters(self) -> dict[str, int]:
        """Name of each per-expert parameter -> its hidden dim (the one tensor parallelism splits)."""
        ...

    def expert_forward(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor: ...


def num_experts(bank: ExpertBank) -> int:
    name = next(iter(bank.expert_parameters()))
    return getattr(bank, name).shape[0]
