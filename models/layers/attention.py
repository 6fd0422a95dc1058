"""Causal self-attention with grouped-query heads.

Head counts are never stored: they are read off the projections' output shapes
(`view(B, T, -1, head_dim)`), so a tensor-parallel plan that shards the columns of wq/wk/wv
(and the rows of wo) by whole heads runs this module unchanged on its local heads.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, max_seq_len: int, rope_theta: float):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # One table per layer (~1 MB at 2048x128) keeps every block self-contained for pipeline stages.
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)
        self.rope.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Heads and sequence length come from the projections' outputs, not from x: under tensor
        # parallelism a rank holds fewer heads, under sequence parallelism x is a sequence shard.
        q = self.rope(self.wq(x).unflatten(-1, (-1, self.head_dim)))
        k = self.rope(self.wk(x).unflatten(-1, (-1, self.head_dim)))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # GQA: query head i reads kv head i // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).flatten(2))
