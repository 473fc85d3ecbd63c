"""Position biases added to attention scores: ALiBi (BLOOM, MPT) and T5's bucketed relative bias.

Each is a module called as `bias(h, q_pos, k_pos)` with the query head and the
query and key positions (int tensors that broadcast), returning what is added to
the scaled score of that head, query and key. Only tensor operators are used, so
the same call serves as flex_attention's score_mod, an explicit [H, T, S] bias
for the math and masked-SDPA kernels, and the positions a decoding cache kept
(archc.kernels.attention takes it as `position_bias`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ALiBi", "RelativePositionBias", "alibi_slopes", "relative_bucket"]


def alibi_slopes(heads: int) -> torch.Tensor:
    """One slope per head, exactly as BLOOM's build_alibi_tensor: for the largest power of two n <= heads,
    2^(-8i/n) for i = 1..n; the heads beyond it take every other slope of 2n heads, 2^(-8(2i-1)/2n)."""
    n = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + n, dtype=torch.int32))
    if n != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * n) - 3))), dtype=torch.float32)
        rest = min(n, heads - n)
        slopes = torch.cat((slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))))
    return slopes


class ALiBi(nn.Module):
    """-slope_h · |i - j|: a linear penalty on distance, one slope per head (no parameters).

    Causally this equals BLOOM's slope_h · j, which differs from it by slope_h · i per query row and so
    gives the same softmax; bidirectionally keys on both sides are penalised alike."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def forward(self, h: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return -self.slopes[h] * (q_pos - k_pos).abs()

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


def relative_bucket(relative: torch.Tensor, *, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact for small distances, log-spaced up to
    max_distance, the last bucket beyond; bidirectional tables give half their buckets to keys after the
    query, causal ones fold them into bucket 0 (as transformers' T5Attention._relative_position_bucket)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).to(torch.long) * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).to(torch.long)
    return bucket + torch.where(relative < exact, relative, large.clamp(max=buckets - 1))


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: weight[bucket(j - i), h], a [buckets, heads] table (HF's
    relative_attention_bias.weight)."""

    def __init__(self, heads: int, buckets: int = 32, max_distance: int = 128, *, bidirectional: bool = True) -> None:
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(buckets, heads))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        bucket = relative_bucket(k_pos - q_pos, bidirectional=self.bidirectional, buckets=self.buckets,
                                 max_distance=self.max_distance)
        return self.weight[bucket, h]

    def scores(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The whole bias [1, heads, T, S] for queries as long as `x` and keys as long as `memory`: what a spec's
        `relative_position_bias(x, memory)` computes once and passes to every layer (T5 shares it)."""
        t, s = x.shape[1], memory.shape[1]
        q_pos = torch.arange(t, device=x.device)[:, None]
        k_pos = torch.arange(s, device=x.device)[None, :]
        bucket = relative_bucket(k_pos - q_pos, bidirectional=self.bidirectional, buckets=self.buckets,
                                 max_distance=self.max_distance)
        return self.weight[bucket].permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        way = "bidirectional" if self.bidirectional else "causal"
        return f"buckets={self.buckets}, heads={self.weight.shape[1]}, max_distance={self.max_distance}, {way}"
