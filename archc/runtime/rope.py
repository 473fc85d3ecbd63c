"""Rotary position embeddings: the rotate-half layout (Llama / Hugging Face) and the interleaved one (DeepSeek-V3).

Both share one angle table — position · inv_freq[i] for pair i, fp32, cached per
(length, device), never saved in the state dict — and take an `offset`: the
position of the first token, non-zero while decoding from a KV cache.

    inv_freq[i] = θ^(-2i/r)         r = rope_dim: the first r dims of each head rotate (partial
                                    rotary: GPT-NeoX, Phi-4-mini, StableLM); the rest pass through

A `scaling` stretches the frequencies for contexts longer than the model was
trained on, exactly as transformers' modeling_rope_utils computes them:

    Llama3RopeScaling   Llama 3.1: by wavelength λ = 2π / inv_freq against L / low_freq_factor and
                        L / high_freq_factor (L = original_max): long wavelengths get inv_freq / factor,
                        short ones stay, those between blend (1 - s)·inv_freq / factor + s·inv_freq
                        with s = (L / λ - low_freq_factor) / (high_freq_factor - low_freq_factor)
    YarnRopeScaling     YaRN: interpolated (inv_freq / factor) and original frequencies blended by a
                        linear ramp over the pair index between the dims that turn beta_fast and
                        beta_slow times over L; cos and sin scaled by the attention factor
                        (default 0.1·ln(factor) + 1)
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

__all__ = ["SCALINGS", "InterleavedRotaryEmbedding", "Llama3RopeScaling", "RotaryEmbedding", "YarnRopeScaling",
           "apply_interleaved_rope", "apply_rope", "inverse_frequencies", "rotate_half"]


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """θ^(-2i/dim) for the dim / 2 pairs, fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


@attrs.frozen
class Llama3RopeScaling:
    """Llama 3.1's frequency bands (`rope_scaling={"rope_type": "llama3", ...}`)."""

    factor: float
    original_max: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    attention_factor = 1.0

    def __attrs_post_init__(self) -> None:
        if not self.factor > 0 or self.original_max <= 0 or not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"llama3 RoPE scaling needs factor > 0, original_max > 0 and high_freq_factor > "
                             f"low_freq_factor > 0, got {self}")

    def inv_freq(self, dim: int, theta: float, device=None) -> torch.Tensor:
        inv_freq = inverse_frequencies(dim, theta, device)
        low_wavelen = self.original_max / self.low_freq_factor
        high_wavelen = self.original_max / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        between = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(between, blended, scaled)


@attrs.frozen
class YarnRopeScaling:
    """YaRN (`rope_scaling={"rope_type": "yarn", ...}`); `attention_factor` None: 0.1·ln(factor) + 1."""

    factor: float
    original_max: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = attrs.field(default=None)
    truncate: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.factor > 0 or self.original_max <= 0 or not self.beta_fast > 0 or not self.beta_slow > 0:
            raise ValueError(f"yarn RoPE scaling needs factor, original_max, beta_fast and beta_slow > 0, got {self}")
        if self.attention_factor is None:
            default = 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0
            object.__setattr__(self, "attention_factor", default)

    def inv_freq(self, dim: int, theta: float, device=None) -> torch.Tensor:
        def correction_dim(rotations: float) -> float:  # the dim whose wavelength turns `rotations` times over L
            return dim * math.log(self.original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
        extrapolation = 1 - ramp  # the share of the original frequency
        wavelength = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # / 2π
        return 1.0 / (self.factor * wavelength) * (1 - extrapolation) + 1.0 / wavelength * extrapolation


RopeScaling = Llama3RopeScaling | YarnRopeScaling
SCALINGS = {"llama3": Llama3RopeScaling, "yarn": YarnRopeScaling}  # by the name `rope_scaling=` and HF's rope_type use


class _Rotary(nn.Module):
    layout = ""

    def __init__(self, head_dim: int, theta: float = 10000.0, *, rope_dim: int | None = None,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        rope_dim = head_dim if rope_dim is None else rope_dim
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise ValueError(f"RoPE rotates an even number of dims, at most head_dim={head_dim}, got {rope_dim}")
        self.head_dim, self.rope_dim = head_dim, rope_dim
        self.theta = theta
        self.scaling = scaling
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every (position, pair) angle for positions 0..length-1: two [length, rope_dim / 2],
        times the scaling's attention factor."""
        key = (length, str(device))
        if key not in self._cache:
            if self.scaling is None:
                inv_freq, factor = inverse_frequencies(self.rope_dim, self.theta, device), 1.0
            else:
                inv_freq = self.scaling.inv_freq(self.rope_dim, self.theta, device)
                factor = self.scaling.attention_factor
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            self._cache[key] = (angles.cos() * factor, angles.sin() * factor)
        return self._cache[key]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _partial(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_dim == self.head_dim:
            return self.rotate(x, cos, sin)
        turned, kept = x.split((self.rope_dim, self.head_dim - self.rope_dim), dim=-1)
        return torch.cat((self.rotate(turned, cos, sin), kept), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, H, T, head_dim], k: [B, K, S, head_dim]; the later of the two starts at position `offset`.

        With S != T (cross-attention) the two are aligned at their ends, as the attention masks are."""
        t, s = q.shape[-2], k.shape[-2]
        end = offset + max(t, s)
        cos, sin = self.angles(end, q.device)
        return self._partial(q, cos[end - t:], sin[end - t:]), self._partial(k, cos[end - s:], sin[end - s:])

    def extra_repr(self) -> str:
        partial = f", rope_dim={self.rope_dim}" if self.rope_dim != self.head_dim else ""
        scaled = f", scaling={self.scaling}" if self.scaling is not None else ""
        return f"head_dim={self.head_dim}, theta={self.theta}{partial}{scaled}{self.layout}"


class RotaryEmbedding(_Rotary):
    """Rotate-half RoPE: the first and second halves of the rotated dims form the pairs (Llama / HF)."""

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
