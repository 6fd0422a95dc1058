"""The oracle: a mixture of experts computed one assignment at a time, with no sorting or padding."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def expert_mix_reference(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                         weights: Sequence[torch.Tensor], *, fan_in: int, fan_out: int,
                         activation: Callable[[torch.Tensor], torch.Tensor] | None = torch.relu) -> torch.Tensor:
    """y[f // fan_out] += gates[f] · (act(x[f // fan_in] @ W0[e]) @ W1[e] ...) for every slot f, e = expert_ids[f].

    x [N_in, d]; expert_ids, gates: F entries in slot order (any shape); weights: one or more [E, d_i, d_{i+1}]
    with `activation` between consecutive ones. Returns [F // fan_out, d_last].
    """
    ids, w = expert_ids.reshape(-1), gates.reshape(-1)
    n_out = ids.numel() // fan_out
    rows = [x.new_zeros(weights[-1].shape[-1]) for _ in range(n_out)]
    for f in range(ids.numel()):
        e = int(ids[f])
        h = x[f // fan_in]
        for i, W in enumerate(weights):
            h = h @ W[e]
            if i < len(weights) - 1 and activation is not None:
                h = activation(h)
        rows[f // fan_out] = rows[f // fan_out] + w[f] * h
    return torch.stack(rows)
