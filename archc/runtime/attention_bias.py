"""What attention adds to its scores beyond the causal / window mask: a key padding mask and a position
bias (T5's bucketed relative positions), as one additive float mask for SDPA."""

from __future__ import annotations

import math

import torch
from torch import nn

from archc.kernels.attention import attention_mask


def score_bias(q: torch.Tensor, k: torch.Tensor, *, causal: bool, window: int | None = None, sinks: int = 0,
               prefix: int = 0, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The additive mask [B or 1, H or 1, T, S] SDPA takes for q [B, H, T, d] and k [B, K, S, d]: the dtype's
    minimum where a key is hidden — by causality, a window, sinks or a prefix (archc.kernels.attention, queries
    aligned at the end of the keys) or by the padding `mask` [B, S] (True: a real token) — plus `bias`.
    A query whose keys are all hidden attends evenly to them (the minimum, not -inf, as transformers does)."""
    t, s = q.shape[-2], k.shape[-2]
    hidden = torch.finfo(q.dtype).min
    out = torch.zeros(1, 1, t, s, dtype=q.dtype, device=q.device)
    if causal or window is not None or sinks or prefix:
        seen = attention_mask(t, s, q.device, causal=causal, window=window, sinks=sinks, prefix=prefix)
        out = out.masked_fill(~seen, hidden)
    if mask is not None:
        out = out.masked_fill(~mask.bool()[:, None, None, :], hidden)
    if bias is not None:
        out = out + bias.to(q.dtype)
    return out


def relative_position_bucket(relative: torch.Tensor, *, bidirectional: bool, buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: half the buckets exact for small distances, the rest
    logarithmic up to `max_distance` (beyond it, the last bucket); bidirectional splits the buckets between
    keys before and after the query, causal counts only keys before it."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    far = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    far = far.clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned position bias: a [buckets, heads] table read at the bucket of each key's distance from each
    query, as [1, heads, T, S] for queries as long as `x` and keys as long as `memory`."""

    def __init__(self, buckets: int, heads: int, max_distance: int = 128, bidirectional: bool = True) -> None:
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(buckets, heads))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        t, s = x.shape[1], memory.shape[1]
        relative = torch.arange(s, device=x.device)[None, :] - torch.arange(t, device=x.device)[:, None]
        bucket = relative_position_bucket(relative, bidirectional=self.bidirectional, buckets=self.buckets,
                                          max_distance=self.max_distance)
        return self.weight[bucket].permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        return (f"buckets={self.buckets}, heads={self.weight.shape[1]}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")
