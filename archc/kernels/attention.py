"""Masked attention: the mask predicate and the kernels generated code calls (`AF.attention_<kernel>`).

Every kernel takes q [B, H, T, d] and k, v [B, K, S, d] (H a multiple of K:
grouped-query) and the same mask options, and returns [B, H, T, d]:

    causal   key j visible to query i iff j <= i (positions aligned at the end when S != T:
             query i sits at position i + S - T, as when decoding after a cache)
    window   w: causal i-w < j <= i; bidirectional |i-j| < w
    sinks    n: the first n keys stay visible to every query (StreamingLLM), still causally
    prefix   n: the first n positions see each other both ways (prefix-LM)

A query that sees no key (possible only when S < T) gets zeros, as flex_attention gives.

Kernels (chosen per layer by the compiler's `choose_kernels` pass):

    math       softmax of explicitly masked scores: the obviously right reference
    sdpa_mask  F.scaled_dot_product_attention with a boolean [T, S] mask (memory O(T·S))
    local      blocked sliding window: queries in blocks of `block`, each block attending only
               to the keys its window reaches (plus the sink / prefix keys) through one batched
               SDPA call with a small mask; cost O(T·(block + w)), linear in T
    flex       torch.nn.attention.flex_attention with a BlockMask built from the same predicate,
               cached per (T, S, device); compiled on CUDA, eager (forward only) elsewhere
    auto       decided per call: plain masks go to SDPA's is_causal, then flex on CUDA (unless
               dropout is on: flex has none), local where there is a window, else sdpa_mask
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["visible", "attention_mask", "local_block", "attention_math", "attention_sdpa_mask", "attention_local",
           "attention_flex", "attention_auto", "resolve"]


def local_block(window: int) -> int:
    """Query block of `local`: 64 up to w = 64, else 128 (the fastest on a 2-core CPU for w from 64 to
    1024 at T = 4k, forward + backward; smaller blocks pay per-block overhead, larger ones masked work)."""
    return 64 if window <= 64 else 128


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window: int | None = None, sinks: int = 0,
            prefix: int = 0) -> torch.Tensor:
    """Whether the key at position k_pos is visible to the query at q_pos (broadcasting int tensors).

    Also flex_attention's mask_mod, so only tensor operators here."""
    if causal:
        seen = k_pos <= q_pos
        if window is not None:
            seen = seen & (k_pos > q_pos - window)
        if sinks:
            seen = seen | ((k_pos < sinks) & (k_pos <= q_pos))
    else:
        distance = q_pos - k_pos
        seen = distance.abs() < window if window is not None else torch.ones_like(distance, dtype=torch.bool)
        if sinks:
            seen = seen | (k_pos < sinks)
    if prefix:
        seen = seen | ((q_pos < prefix) & (k_pos < prefix))
    return seen


def attention_mask(t: int, s: int, device=None, **opts) -> torch.Tensor:
    """The [t, s] boolean mask (True = visible) of `visible`, queries aligned at the end of the keys."""
    q_pos = torch.arange(t, device=device)[:, None] + (s - t)
    return visible(q_pos, torch.arange(s, device=device)[None, :], **opts)


def _plain(window, sinks: int, prefix: int) -> bool:
    """No mask beyond SDPA's own (none, or causal)."""
    return window is None and not sinks and not prefix


def resolve(q: torch.Tensor, k: torch.Tensor, *, causal: bool, window: int | None = None, sinks: int = 0,
            prefix: int = 0, dropout_p: float = 0.0) -> str:
    """The kernel `auto` runs for these tensors."""
    t, s = q.shape[-2], k.shape[-2]
    if window is not None and window >= (s if causal else max(s, t)):
        window = None  # the window reaches every key: it masks nothing
    if window is None:
        sinks = 0  # without a window the sinks are visible anyway
    if not causal and window is None:
        prefix = 0
    if _plain(window, sinks, prefix) and (not causal or t == s):
        return "sdpa"
    if q.is_cuda and not dropout_p:
        return "flex"
    return "local" if window is not None else "sdpa_mask"


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[-3] != k.shape[-3]


# ---- kernels -------------------------------------------------------------------------------------


def attention_math(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ/√d with hidden keys at -inf) v, the hidden ones then set to exactly 0."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal or not _plain(window, sinks, prefix):
        mask = attention_mask(q.shape[-2], k.shape[-2], q.device, causal=causal, window=window, sinks=sinks,
                              prefix=prefix)
        scores = scores.masked_fill(~mask, float("-inf"))
        # a row with no visible key is all -inf (NaN after softmax): make it zeros
        probs = torch.softmax(scores.float(), dim=-1).masked_fill(~mask, 0.0).to(q.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attention_sdpa_mask(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                        dropout_p: float = 0.0) -> torch.Tensor:
    mask = attention_mask(q.shape[-2], k.shape[-2], q.device, causal=causal, window=window, sinks=sinks,
                          prefix=prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=_gqa(q, k))


def attention_local(q, k, v, *, causal: bool, window: int, sinks: int = 0, prefix: int = 0,
                    dropout_p: float = 0.0, block: int | None = None) -> torch.Tensor:
    """Blocked sliding-window attention, linear in T.

    Query block m (positions p in [m·block, (m+1)·block) + S - T) reads the keys
    its window reaches, [m·block + S - T - left, (m+1)·block + S - T + right),
    taken as overlapping slices of the zero-padded keys (`unfold`), plus the
    first g = max(sinks, prefix) keys, which every block reads and which are
    hidden in its window slice so that none is counted twice. One SDPA call
    with a [blocks, block, g + slice] mask does all blocks at once.
    """
    if window is None:
        raise ValueError("attention_local needs a window")
    B, H, T, d = q.shape
    S = k.shape[-2]
    off = S - T
    left, right = window - 1, (0 if causal else window - 1)
    block = max(1, min(block or local_block(window), T))
    n = -(-T // block)
    span = block + left + right
    g = min(max(sinks, prefix), S)

    # keys: pad so that every block's slice lies inside, then take the n overlapping slices
    start = off - left  # key position of the first block's first slot
    front = max(0, -start)
    back = max(0, (n - 1) * block + start + front + span - (S + front))
    both = torch.stack((k, v))  # [2, B, K, S, d]: one pad and one unfold for both
    kv = F.pad(both, (0, 0, front, back))[:, :, :, start + front:]
    kv = kv.unfold(3, span, block)[:, :, :, :n]  # [2, B, K, n, d, span]
    kv = kv.permute(0, 1, 3, 2, 5, 4)  # [2, B, n, K, span, d]
    if g:
        glob = both[:, :, None, :, :g].expand(-1, -1, n, -1, -1, -1)
        kv = torch.cat((glob, kv), dim=4)
    kb, vb = kv.unbind(0)

    qb = F.pad(q, (0, 0, 0, n * block - T)).view(B, H, n, block, d).transpose(1, 2)  # [B, n, H, block, d]
    base = torch.arange(n, device=q.device)[:, None] * block  # [n, 1]
    q_pos = (base + torch.arange(block, device=q.device) + off)[:, :, None]  # [n, block, 1]
    k_pos = (base + start + torch.arange(span, device=q.device))[:, None, :]  # [n, 1, span]
    opts = dict(causal=causal, window=window, sinks=sinks, prefix=prefix)
    mask = visible(q_pos, k_pos, **opts) & (k_pos >= g) & (k_pos < S)
    if g:
        g_pos = torch.arange(g, device=q.device)[None, None, :]
        mask = torch.cat((visible(q_pos, g_pos, **opts).expand(-1, block, -1), mask), dim=-1)
    # blocks folded into the batch: 4-D inputs keep SDPA on its fused CPU kernel (5-D falls back to math)
    out = F.scaled_dot_product_attention(qb.reshape(B * n, H, block, d), kb.reshape(B * n, -1, kb.shape[-2], d),
                                         vb.reshape(B * n, -1, kb.shape[-2], d),
                                         attn_mask=mask[:, None].repeat(B, 1, 1, 1), dropout_p=dropout_p,
                                         enable_gqa=_gqa(q, k))
    return out.view(B, n, H, block, d).transpose(1, 2).reshape(B, H, n * block, d)[:, :, :T]


@functools.lru_cache(maxsize=64)
def _block_mask(t: int, s: int, device: str, causal: bool, window, sinks: int, prefix: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx + (s - t), kv_idx, causal=causal, window=window, sinks=sinks, prefix=prefix)

    return create_block_mask(mask_mod, None, None, t, s, device=device)


@functools.cache
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the full score matrix; only the compiled one is block-sparse.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def attention_flex(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0) -> torch.Tensor:
    if dropout_p:
        raise ValueError("flex_attention has no attention dropout; use kernel local, sdpa_mask or math")
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("flex_attention has no backward on the CPU in torch "
                           f"{torch.__version__}; compile with --kernel PATTERN=local (or sdpa_mask) here")
    block_mask = _block_mask(q.shape[-2], k.shape[-2], str(q.device), causal, window, sinks, prefix)
    return _flex(q.is_cuda)(q, k, v, block_mask=block_mask, enable_gqa=_gqa(q, k))


_KERNELS = {"math": attention_math, "sdpa_mask": attention_sdpa_mask, "local": attention_local,
            "flex": attention_flex}


def attention_auto(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """The kernel `resolve` picks for these tensors and this device."""
    kernel = resolve(q, k, causal=causal, window=window, sinks=sinks, prefix=prefix, dropout_p=dropout_p)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, enable_gqa=_gqa(q, k))
    return _KERNELS[kernel](q, k, v, causal=causal, window=window, sinks=sinks, prefix=prefix, dropout_p=dropout_p)
