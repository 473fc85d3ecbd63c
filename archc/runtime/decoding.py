"""State that generated modules carry while decoding one call after another: KV caches and positions.

Outside decoding they hold nothing (no parameters, nothing in the state dict)
and generated code does not call them. `archc.runtime.mixers.recurrent(model)` switches every one of them
— and every linear-attention core — into decoding, where each call continues
the sequence the previous calls fed: attention sees the keys and values of all
earlier tokens, RoPE and learned positions start at the number of tokens seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archc.kernels.attention import attention_at, attention_auto, visible


class Decoding(nn.Module):
    """A module with per-sequence state while decoding; `start()` / `stop()` are called by `recurrent()`."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.length = 0  # tokens seen so far in this decoding: the position of the next one

    def start(self) -> None:
        self.active, self.length = True, 0

    def stop(self) -> None:
        self.active, self.length = False, 0


class KVCache(Decoding):
    """Keys and values a causal self-attention layer's later queries can still see, while decoding.

    `attend(q, k, v, causal=True, window=, sinks=, prefix=, scale=, softcap=, position_bias=)`
    appends this call's keys and values ([B, K, T, d]) and attends this call's
    queries — positions `length`.. of the sequence — over the cached ones with the
    layer's mask (`archc.kernels.attention.visible` on the keys' true positions),
    scale, soft-cap and position bias (ALiBi, T5's table: computed from the same
    true positions). The first call (the prompt) runs the layer's own
    `attention_auto`. A windowed layer then drops what no later query can see: the
    cache holds the sinks (and prefix) plus the last window - 1 keys, so its memory
    stays bounded; without a window it holds every key.
    """

    def __init__(self) -> None:
        super().__init__()
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # of the cached keys

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
               window: int | None = None, sinks: int = 0, prefix: int = 0, scale: float | None = None,
               softcap: float | None = None, position_bias=None) -> torch.Tensor:
        mask = dict(causal=causal, window=window, sinks=sinks, prefix=prefix)
        scores = dict(scale=scale, softcap=softcap, position_bias=position_bias)
        new = torch.arange(self.length, self.length + q.shape[-2], device=q.device)
        if self.k is None:
            out = attention_auto(q, k, v, **mask, **scores)
            positions = new
        else:
            k, v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
            positions = torch.cat((self.positions, new))
            if softcap is None and position_bias is None:
                seen = visible(new[:, None], positions[None, :], **mask)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale,
                                                     enable_gqa=q.shape[-3] != k.shape[-3])
            else:  # explicit scores: the soft-cap and the bias at the cached keys' true positions
                out = attention_at(q, k, v, new, positions, **mask, **scores)
        self.length += q.shape[-2]
        if window is not None:  # the next query sits at `length` and sees keys after length - window
            keep = (positions < max(sinks, prefix)) | (positions > self.length - window)
            k, v, positions = k[..., keep, :], v[..., keep, :], positions[keep]
        self.k, self.v, self.positions = k, v, positions
        return out

    def stop(self) -> None:
        super().stop()
        self.k = self.v = self.positions = None


class InputHistory(Decoding):
    """The inputs of every call so far, for a layer that recomputes itself over the whole prefix while decoding.

    Correct for any causal layer (the outputs of earlier positions do not change), not incremental:
    each call costs a forward over the prefix. NSA uses it until its branches get caches of their own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.parts: tuple[torch.Tensor, ...] | None = None

    def extend(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append this call's [B, T, ...] inputs; returns those of the whole prefix."""
        if self.parts is not None:
            parts = tuple(torch.cat((old, new), dim=1) for old, new in zip(self.parts, parts))
        self.parts, self.length = parts, parts[0].shape[1]
        return parts

    def stop(self) -> None:
        super().stop()
        self.parts = None


class LearnedPositions(nn.Embedding):
    """Learned absolute positions (`pos_embedding`): rows offset..offset+T of the table, offset > 0 only while
    decoding."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__(max_len, dim)
        self.active = False
        self.length = 0

    start = Decoding.start
    stop = Decoding.stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> the [T, D] rows to add."""
        # A lookup rather than a slice of the weight: a module returning a view of its own
        # parameter trips module hooks (FlopCounterMode's module tracker) under no_grad.
        if not self.active:  # no Python arithmetic on the length here, so torch.fx can trace it
            return super().forward(torch.arange(x.shape[1], device=self.weight.device))
        start, length = self.length, x.shape[1]
        if start + length > self.num_embeddings:
            raise ValueError(f"positions {start}..{start + length - 1} exceed the table's "
                             f"max_len={self.num_embeddings}")
        self.length = start + length
        return super().forward(torch.arange(start, start + length, device=self.weight.device))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, index = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop tokens once the mass before them already reaches top_p (always keep the first)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
