"""What attention adds to its scores beyond the causal / window mask: a key padding mask and a position
bias given as a tensor (e.g. T5's table), as one additive float mask for SDPA."""

from __future__ import annotations

import torch

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
