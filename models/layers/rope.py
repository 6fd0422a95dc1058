"""Rotary position embeddings (half-split "rotate_half" layout, as in GPT-NeoX / HF Llama).

cos/sin tables are non-persistent buffers: derived data, kept out of checkpoints. A module
built on the meta device and materialised with `to_empty()` holds garbage in them;
`reset_parameters()` recomputes them in place, and every model's `init_weights()` calls it,
so the meta -> to_empty -> init_weights path ends with correct tables.
"""
import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
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

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: [B, T, H, D] with positions start..start+T-1; returns the rotated tensor in x's dtype."""
        T = x.shape[1]
        cos = self.cos[start:start + T, None, :].float()  # [T, 1, D/2], broadcast over batch and heads
        sin = self.sin[start:start + T, None, :].float()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
