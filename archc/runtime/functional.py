"""Small layers and functions that generated modules call (imported there as `AF`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from archc.runtime.mla import InterleavedRotaryEmbedding  # noqa: F401
from archc.runtime.moe import GroupedLinear, Router, Routing, combine_rows, dispatch_rows, moe_aux_loss  # noqa: F401
from archc.runtime.mixers import GatedDeltaNetCore, KDACore, LinearAttentionCore, SSDCore  # noqa: F401


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half convention (as in Llama / Hugging Face).

    cos/sin are computed in fp32 and cached per (length, device); nothing is
    saved in the state dict.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                             / self.head_dim))
            freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache[key] = (emb.cos(), emb.sin())
        return self._cache[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, H, T, head_dim]."""
        cos, sin = self.cos_sin(q.shape[-2], q.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention with an explicit mask: softmax(q kᵀ/√d + mask) v.

    q: [B, H, T, d]; k, v: [B, K, S, d] with H a multiple of K (grouped-query).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        t, s = q.shape[-2], k.shape[-2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights for linears, embeddings and stacked experts, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding, GroupedLinear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
