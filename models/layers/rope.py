"""Rotary position embeddings (half-split "rotate_half" layout, as in GPT-NeoX / HF Llama).

cos/sin tables are non-persistent buffers: derived data, kept out of checkpoints. A module
built on the meta device and materialised with `to_empty()` holds garbage in them;
`reset_parameters()` recomputes them in place, and every model's `init_weights()` calls it,
so the meta -> to_empty -> init_weights path ends with correct tables.

The tables stay float64 whatever the model's dtype (`model.bfloat16()`, `.to(dtype)` and `.double()`
move them but do not cast them): the rotation runs in `promote_types(x.dtype, float32)`, so a float64
model rotates exactly and a bf16 one with fp32 tables, never with tables rounded to bf16.
"""
from collections.abc import Callable

import torch
from torch import nn

from models.layers.norm import upcast

_TABLES = ("cos", "sin")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        for name in _TABLES:
            self.register_buffer(name, torch.empty(max_seq_len, head_dim // 2, dtype=torch.float64),
                                 persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        # Tables are computed on CPU in fp64 so every device and rank gets bit-identical values.
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def init_buffers(self) -> None:
        """The tables are derived data (models/init.py): recomputed after materialising."""
        self.reset_parameters()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "RotaryEmbedding":
        # Module-wide casts reach buffers too; a table cast to bf16 would rotate with ~3 significant
        # digits. Let device moves (and to_empty) through, undo dtype changes: forward casts the rows it uses.
        before = {name: self._buffers[name] for name in _TABLES}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: [B, T, H, D] with positions start..start+T-1; returns the rotated tensor in x's dtype."""
        T = x.shape[1]
        xf = upcast(x)  # bf16/fp16 rotate in fp32, float64 stays float64
        cos = self.cos[start:start + T, None, :].to(xf.dtype)  # [T, 1, D/2], broadcast over batch and heads
        sin = self.sin[start:start + T, None, :].to(xf.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
