"""Masked attention: the mask predicate and the kernels generated code calls (`AF.attention_<kernel>`).

Every kernel takes q [B, H, T, d] and k, v [B, K, S, d] (H a multiple of K:
grouped-query) and the same mask options, and returns [B, H, T, d]:

    causal   key j visible to query i iff j <= i (positions aligned at the end when S != T:
             query i sits at position i + S - T, as when decoding after a cache)
    window   w: causal i-w < j <= i; bidirectional |i-j| < w
    sinks    n: the first n keys stay visible to every query (StreamingLLM), still causally
    prefix   n: the first n positions see each other both ways (prefix-LM)

A query that sees no key (possible only when S < T) gets zeros, as flex_attention gives.

Scores are `scale` · q·kᵀ (default 1/√d), then optionally modified before the mask:

    softcap        s·tanh(score / s) (Gemma 2's logit soft-capping)
    position_bias  plus bias(h, i, j): a callable of the query head and the query and key positions
                   (int tensors that broadcast; tensor operators only, as it is also flex_attention's
                   score_mod), e.g. ALiBi or T5's bucketed table (archc.runtime.position_bias)

Only `math` (explicit scores) and `flex` (a score_mod) apply both; `sdpa_mask` adds a position
bias through a float mask but cannot soft-cap; `sdpa` and `local` apply neither. Every kernel
takes `scale`.

Kernels (chosen per layer by the compiler's `choose_kernels` pass):

    math       softmax of explicitly masked scores: the obviously right reference
    sdpa_mask  F.scaled_dot_product_attention with a boolean [T, S] mask (memory O(T·S))
    local      blocked sliding window: queries in blocks of `block`, each block attending only
               to the keys its window reaches (plus the sink / prefix keys) through one batched
               SDPA call with a small mask; cost O(T·(block + w)), linear in T
    flex       torch.nn.attention.flex_attention with a BlockMask built from the same predicate,
               cached per (T, S, device); compiled on CUDA, eager (forward only) elsewhere
    auto       decided per call: plain masks without score modifications go to SDPA's is_causal,
               then flex on CUDA (unless dropout is on: flex has none); elsewhere math for a
               soft-cap, sdpa_mask for a position bias, local where there is a window, else sdpa_mask
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["visible", "attention_mask", "local_block", "attention_at", "attention_math", "attention_sdpa_mask",
           "attention_local", "attention_flex", "attention_auto", "resolve", "softcapped"]


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
            prefix: int = 0, dropout_p: float = 0.0, softcap: float | None = None, position_bias=None) -> str:
    """The kernel `auto` runs for these tensors."""
    t, s = q.shape[-2], k.shape[-2]
    if window is not None and window >= (s if causal else max(s, t)):
        window = None  # the window reaches every key: it masks nothing
    if window is None:
        sinks = 0  # without a window the sinks are visible anyway
    if not causal and window is None:
        prefix = 0
    scored = softcap is not None or position_bias is not None
    if _plain(window, sinks, prefix) and (not causal or t == s) and not scored:
        return "sdpa"
    if q.is_cuda and not dropout_p:
        return "flex"
    if softcap is not None:
        return "math"
    return "local" if window is not None and not scored else "sdpa_mask"


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[-3] != k.shape[-3]


# ---- kernels -------------------------------------------------------------------------------------


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """s·tanh(scores / s), or the scores as they are without a cap."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _bias(position_bias, heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The [H, T, S] bias of every head, query and key position."""
    h = torch.arange(heads, device=q_pos.device)[:, None, None]
    return position_bias(h, q_pos[None, :, None], k_pos[None, None, :])


def attention_at(q, k, v, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window: int | None = None,
                 sinks: int = 0, prefix: int = 0, dropout_p: float = 0.0, scale: float | None = None,
                 softcap: float | None = None, position_bias=None) -> torch.Tensor:
    """Explicit scores of queries at positions q_pos [T] against keys at k_pos [S] (any positions: a
    decoding cache passes the ones it kept): scale, soft-cap, position bias, the mask at -inf, softmax
    in fp32; a query that sees no key gets exactly 0."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcapped((q @ k.transpose(-2, -1)) * scale, softcap)
    if position_bias is not None:
        scores = scores + _bias(position_bias, heads, q_pos, k_pos).to(scores.dtype)
    mask = visible(q_pos[:, None], k_pos[None, :], causal=causal, window=window, sinks=sinks, prefix=prefix)
    # a row with no visible key is all -inf (NaN after softmax): make it zeros
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1)
    probs = probs.masked_fill(~mask, 0.0).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _aligned(t: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions of a call: keys 0..s-1, queries at the end of them."""
    return torch.arange(t, device=device) + (s - t), torch.arange(s, device=device)


def attention_math(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0, scale: float | None = None, softcap: float | None = None,
                   position_bias=None) -> torch.Tensor:
    """softmax(modified scores with hidden keys at -inf) v, the hidden ones then set to exactly 0."""
    q_pos, k_pos = _aligned(q.shape[-2], k.shape[-2], q.device)
    return attention_at(q, k, v, q_pos, k_pos, causal=causal, window=window, sinks=sinks, prefix=prefix,
                        dropout_p=dropout_p, scale=scale, softcap=softcap, position_bias=position_bias)


def _unfit(kernel: str, softcap, position_bias, bias_ok: bool = False) -> None:
    if softcap is not None or (position_bias is not None and not bias_ok):
        what = "soft-cap scores" if softcap is not None else "add a position bias"
        raise ValueError(f"attention kernel {kernel} cannot {what}; use math or flex (or auto)")


def attention_sdpa_mask(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                        dropout_p: float = 0.0, scale: float | None = None, softcap: float | None = None,
                        position_bias=None) -> torch.Tensor:
    """SDPA with the mask as a boolean [T, S] tensor, or with a position bias as a float [H, T, S] one
    (the bias where visible, -inf elsewhere)."""
    _unfit("sdpa_mask", softcap, position_bias, bias_ok=True)
    mask = attention_mask(q.shape[-2], k.shape[-2], q.device, causal=causal, window=window, sinks=sinks,
                          prefix=prefix)
    if position_bias is not None:
        bias = _bias(position_bias, q.shape[1], *_aligned(q.shape[-2], k.shape[-2], q.device))
        mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=_gqa(q, k))


def attention_local(q, k, v, *, causal: bool, window: int, sinks: int = 0, prefix: int = 0,
                    dropout_p: float = 0.0, scale: float | None = None, softcap: float | None = None,
                    position_bias=None, block: int | None = None) -> torch.Tensor:
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
    _unfit("local", softcap, position_bias)
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
                                         scale=scale, enable_gqa=_gqa(q, k))
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


def _score_mod(t: int, s: int, softcap: float | None, position_bias):
    """flex_attention's score_mod for a soft-cap and / or a position bias (None when there is neither)."""
    if softcap is None and position_bias is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        score = softcapped(score, softcap)
        if position_bias is not None:
            score = score + position_bias(h, q_idx + (s - t), kv_idx)
        return score

    return score_mod


def attention_flex(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0, scale: float | None = None, softcap: float | None = None,
                   position_bias=None) -> torch.Tensor:
    if dropout_p:
        raise ValueError("flex_attention has no attention dropout; use kernel local, sdpa_mask or math")
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("flex_attention has no backward on the CPU in torch "
                           f"{torch.__version__}; compile with --kernel PATTERN=local (or sdpa_mask) here")
    t, s = q.shape[-2], k.shape[-2]
    block_mask = _block_mask(t, s, str(q.device), causal, window, sinks, prefix)
    return _flex(q.is_cuda)(q, k, v, score_mod=_score_mod(t, s, softcap, position_bias), block_mask=block_mask,
                            scale=scale, enable_gqa=_gqa(q, k))


_KERNELS = {"math": attention_math, "sdpa_mask": attention_sdpa_mask, "local": attention_local,
            "flex": attention_flex}


def attention_auto(q, k, v, *, causal: bool, window: int | None = None, sinks: int = 0, prefix: int = 0,
                   dropout_p: float = 0.0, scale: float | None = None, softcap: float | None = None,
                   position_bias=None) -> torch.Tensor:
    """The kernel `resolve` picks for these tensors and this device."""
    kernel = resolve(q, k, causal=causal, window=window, sinks=sinks, prefix=prefix, dropout_p=dropout_p,
                     softcap=softcap, position_bias=position_bias)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=_gqa(q, k))
    return _KERNELS[kernel](q, k, v, causal=causal, window=window, sinks=sinks, prefix=prefix, dropout_p=dropout_p,
                            scale=scale, softcap=softcap, position_bias=position_bias)
