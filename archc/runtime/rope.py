"""Rotary position embeddings: the rotate-half layout (Llama / Hugging Face) and the interleaved one (DeepSeek-V3).

Both share one angle table — position · θ^(-2i/d) for pair i, fp32, cached per
(length, device), never saved in the state dict — and take an `offset`: the
position of the first token, non-zero while decoding from a KV cache.
"""

from __future__ import annotations

import torch
from torch import nn


class _Rotary(nn.Module):
    layout = ""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every (position, pair) angle for positions 0..length-1: two [length, head_dim / 2]."""
        key = (length, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                             / self.head_dim))
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, H, T, head_dim], k: [B, K, S, head_dim]; the later of the two starts at position `offset`.

        With S != T (cross-attention) the two are aligned at their ends, as the attention masks are."""
        t, s = q.shape[-2], k.shape[-2]
        end = offset + max(t, s)
        cos, sin = self.angles(end, q.device)
        return self.rotate(q, cos[end - t:], sin[end - t:]), self.rotate(k, cos[end - s:], sin[end - s:])

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}{self.layout}"


class RotaryEmbedding(_Rotary):
    """Rotate-half RoPE: the first and second halves of the head dim form the pairs (Llama / HF)."""

    def rotate(self, x, cos, sin):
        return apply_rope(x, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))


class InterleavedRotaryEmbedding(_Rotary):
    """RoPE on interleaved pairs, as Hugging Face's DeepSeek-V3 (`rope_interleave=True`) computes it.

    Pair i = (x[2i], x[2i+1]). The result is laid out de-interleaved — the rotated
    first members of the pairs, then the second members — exactly as HF returns
    it; queries and keys get the same layout, so their dot products are those of
    the interleaved rotation.
    """

    layout = ", interleaved"

    def rotate(self, x, cos, sin):
        return apply_interleaved_rope(x, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE with full-width cos/sin ([T, head_dim])."""
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., 0::2], x[..., 1::2]) by the angles whose cos/sin are given ([T, d/2])."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x[..., 0::2], x[..., 1::2]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
