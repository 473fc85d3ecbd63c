"""What generated Multi-head Latent Attention (`mla(...)`, DeepSeek-V2/V3) calls.

MLA compresses keys and values into one low-rank latent per token and keeps
position in a separate, narrow RoPE part of each query and key; the key's
RoPE part is one head shared by all query heads. The projections and norms
are ordinary modules in the generated class; this file holds the rotary
embedding DeepSeek-V3 uses, in which the rotated dimensions are interleaved
pairs (x0, x1), (x2, x3), ... rather than the two halves of Llama's RoPE.
Generated code reaches it as `AF.InterleavedRotaryEmbedding`.
"""

from __future__ import annotations

import torch
from torch import nn


class InterleavedRotaryEmbedding(nn.Module):
    """RoPE on interleaved pairs, as Hugging Face's DeepSeek-V3 (`rope_interleave=True`) computes it.

    Pair i = (x[2i], x[2i+1]) turns by position · θ^(-2i/d). The result is laid
    out de-interleaved — the rotated first members of the pairs, then the second
    members — exactly as HF returns it; queries and keys get the same layout, so
    their dot products are those of the interleaved rotation. cos/sin are fp32,
    cached per (length, device), and never saved.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every (position, pair) angle: two [length, head_dim / 2] tensors."""
        key = (length, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                             / self.head_dim))
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, H, T, head_dim]; k: [B, K, T, head_dim] (K = 1 for MLA's shared key)."""
        cos, sin = self.cos_sin(q.shape[-2], q.device)
        return apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, interleaved"


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., 0::2], x[..., 1::2]) by the angles whose cos/sin are given ([T, d/2])."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x[..., 0::2], x[..., 1::2]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
