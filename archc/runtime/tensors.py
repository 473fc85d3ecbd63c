"""Tensor helpers generated code calls where PyTorch has no one-call form."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: each example (first axis) kept with probability 1 - p and scaled by 1 / (1 - p) while
    training; `x` itself otherwise."""
    if not training or p == 0.0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Positions(nn.Module):
    """The positions 0 … n-1 of `arange(n)` for a fixed n, made on the model's device when called (an empty
    buffer follows the device; nothing of size n is kept, so building a model allocates nothing for it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.register_buffer("anchor", torch.empty(0, dtype=torch.long), persistent=False)

    def forward(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.anchor.device)


def shift(x: torch.Tensor, n: int, dim: int = 1, fill: float = 0) -> torch.Tensor:
    """`x` with its positions along `dim` moved n later (earlier for n < 0), the n vacated ones set to `fill`:
    `shift(tokens, 1)[:, t]` is `tokens[:, t - 1]`, and `fill` at t = 0."""
    if n == 0:
        return x
    size = x.shape[dim]
    n = max(-size, min(size, n))
    filler = torch.full_like(x.narrow(dim, 0, abs(n)), fill)
    if n > 0:
        return torch.cat([filler, x.narrow(dim, 0, size - n)], dim=dim)
    return torch.cat([x.narrow(dim, -n, size + n), filler], dim=dim)
