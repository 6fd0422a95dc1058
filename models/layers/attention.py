"""Causal self-attention with grouped-query heads, optionally over a sliding window.

Head counts are never stored: they are read off the projections' output shapes
(`view(B, T, -1, head_dim)`), so a tensor-parallel plan that shards the columns of wq/wk/wv
(and the rows of wo) by whole heads runs this module unchanged on its local heads.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.init import Fill, init_module, normal, zeros
from models.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, max_seq_len: int, rope_theta: float,
                 window: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.head_dim = dim // n_heads
        self.window = window  # a token sees itself and the window-1 tokens before it; None: all before it
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)  # biases: Qwen2's (models/hf_interop.py)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # One float64 table per layer (~2 MB at 2048x128) keeps every block self-contained for pipeline stages.
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def init_rules(self, init_std: float, out_std: float) -> dict[str, Fill]:
        rules = {"wq.weight": normal(init_std), "wk.weight": normal(init_std), "wv.weight": normal(init_std),
                 "wo.weight": normal(out_std)}
        if self.wq.bias is not None:
            rules |= {"wq.bias": zeros, "wk.bias": zeros, "wv.bias": zeros}
        return rules

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_module(self, self.init_rules(init_std, out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Heads and sequence length come from the projections' outputs, not from x: under tensor
        # parallelism a rank holds fewer heads, under sequence parallelism x is a sequence shard.
        q = self.rope(self.wq(x).unflatten(-1, (-1, self.head_dim)))
        k = self.rope(self.wk(x).unflatten(-1, (-1, self.head_dim)))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        mask = None
        if self.window is not None and self.window < q.shape[1]:
            pos = torch.arange(q.shape[1], device=x.device)
            back = pos[:, None] - pos[None, :]
            mask = (back >= 0) & (back < self.window)
        return self.wo(self._attend(q, k, v, mask).flatten(2))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool = True) -> torch.Tensor:
        """[B, T, H, D] in and out."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # GQA: query head i reads kv head i // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row, x [B, 1, dim]; `cache` (empty at the start) keeps keys/values, the last
        `window` of them under a sliding window."""
        pos = cache.get("pos", 0)
        q = self.rope(self.wq(x).unflatten(-1, (-1, self.head_dim)), start=pos)
        k = self.rope(self.wk(x).unflatten(-1, (-1, self.head_dim)), start=pos)
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
        if self.window is not None:
            k, v = k[:, -self.window:], v[:, -self.window:]
        cache.update(k=k, v=v, pos=pos + 1)
        return self.wo(self._attend(q, k, v, None, causal=False).flatten(2))
