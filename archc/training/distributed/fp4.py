"""4-bit floats for outer gradients: quantise, pack two codes per byte, dequantise.

Streaming DiLoCo sends its outer gradients in 4 bits and accumulates them in
fp32 (Streaming DiLoCo, Douillard et al. 2025, arXiv:2501.18512). No library has that wire format on the CPU, so it is
written here, around a plain `torch.distributed.all_gather`.

Formats (a code is 4 bits: bit 3 = sign, bits 0-2 = index into a magnitude grid
of 8 values; the value is ±grid[index] · scale):

- ``e3m0``: sign + 3-bit exponent, no mantissa: powers of two. Exponent code 0
  is reserved for zero (as subnormal/zero encodings are), so the grid is
  {0, 2^-6, 2^-5, 2^-4, 2^-3, 2^-2, 2^-1, 1}; scale = max |x| of the block.
- ``e2m1``: the OCP MX / NVFP4 element grid {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  scale = max |x| / 6.

Scales are fp32, one per tensor (``block_size=None``) or per block of
``block_size`` consecutive elements. Rounding is to the nearest grid value
(ties to the smaller magnitude), so for x in [g_i·s, g_{i+1}·s] the error is at
most ½·(g_{i+1} − g_i)·s: half the gap between neighbouring grid points times
the scale. Values on the grid come back exactly. The packed codes take
ceil(n/2) bytes: 1/8 of fp32, plus 4 bytes per scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

GRIDS = {
    "e3m0": (0.0, 2.0 ** -6, 2.0 ** -5, 2.0 ** -4, 2.0 ** -3, 2.0 ** -2, 2.0 ** -1, 1.0),
    "e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}
FORMATS = tuple(GRIDS)


def grid(fmt: str) -> torch.Tensor:
    if fmt not in GRIDS:
        from archc.dsl.diagnostics import did_you_mean
        raise ValueError(f"unknown 4-bit format `{fmt}`; " + (did_you_mean(fmt, FORMATS)
                                                              or f"choose from {', '.join(FORMATS)}"))
    return torch.tensor(GRIDS[fmt], dtype=torch.float32)


@dataclass
class Packed:
    """A quantised tensor: `codes` (uint8, two per byte), fp32 `scales`, and how to undo it."""

    codes: torch.Tensor
    scales: torch.Tensor
    numel: int
    shape: tuple[int, ...]
    fmt: str
    block_size: int | None

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4


def _blocks(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    if block_size is None:
        return flat.reshape(1, -1)
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block_size)


def quantize(x: torch.Tensor, fmt: str = "e3m0", block_size: int | None = None) -> Packed:
    """Round x to the nearest value of the format's grid × per-block scale and pack the codes."""
    g = grid(fmt)
    blocks = _blocks(x, block_size)
    amax = blocks.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / g[-1], torch.ones_like(amax))
    mag = blocks.abs() / scales[:, None]
    mids = (g[1:] + g[:-1]) / 2
    index = torch.bucketize(mag, mids)  # nearest grid point (ties to the smaller one)
    codes = (index | (blocks < 0).to(torch.long) << 3).to(torch.uint8).reshape(-1)[: x.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = codes[0::2] | (codes[1::2] << 4)
    return Packed(packed, scales, x.numel(), tuple(x.shape), fmt, block_size)


def dequantize(p: Packed) -> torch.Tensor:
    """The fp32 tensor the codes stand for."""
    g = grid(p.fmt)
    codes = torch.stack([p.codes & 0xF, p.codes >> 4], dim=1).reshape(-1)[: p.numel].to(torch.long)
    values = g[codes & 7] * (1 - 2 * (codes >> 3)).to(torch.float32)
    if p.block_size is None:
        values = values * p.scales[0]
    else:
        scale = p.scales.repeat_interleave(p.block_size)[: p.numel]
        values = values * scale
    return values.reshape(p.shape)


def error_bound(x: torch.Tensor, fmt: str = "e3m0", block_size: int | None = None) -> torch.Tensor:
    """Per element: half the gap between the grid points enclosing |x|/scale, times the scale."""
    g = grid(fmt)
    blocks = _blocks(x, block_size)
    amax = blocks.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / g[-1], torch.ones_like(amax))
    mag = blocks.abs() / scales[:, None]
    upper = torch.bucketize(mag, g).clamp(1, len(g) - 1)
    half_gap = (g[upper] - g[upper - 1]) / 2
    return (half_gap * scales[:, None]).reshape(-1)[: x.numel()].reshape(x.shape)


def packed_bytes(numel: int, block_size: int | None = None) -> int:
    """Bytes on the wire for one tensor: ceil(n/2) codes plus 4 bytes per scale."""
    blocks = 1 if block_size is None else -(-numel // block_size)
    return -(-numel // 2) + 4 * blocks


class _Pending:
    """An in-flight quantized all-reduce: `wait()` returns the fp32 mean."""

    def __init__(self, work, gathered, packed: Packed, world: int, out: torch.Tensor | None):
        self.work, self.gathered, self.packed, self.world, self.out = work, gathered, packed, world, out
        self.wait_seconds = 0.0

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        self.wait_seconds += time.perf_counter() - t0
        p = self.packed
        n_codes = p.codes.numel()
        total = torch.zeros(p.shape, dtype=torch.float32)
        for buf in self.gathered:  # every rank sums the same dequantised inputs in the same order
            scales = buf[n_codes:].clone().view(torch.float32)
            total += dequantize(Packed(buf[:n_codes], scales, p.numel, p.shape, p.fmt, p.block_size))
        total /= self.world
        if self.out is not None:
            self.out.copy_(total.to(self.out.dtype))
            return self.out
        return total


def quantized_all_reduce(tensor: torch.Tensor, group=None, fmt: str = "e3m0", block_size: int | None = None,
                         async_op: bool = False, inplace: bool = True):
    """Average `tensor` over the group, sending 4-bit codes (all-gather of packed bytes + scales).

    Every rank dequantises all contributions (its own too) and sums them in fp32
    in rank order, so all ranks get bit-identical results. Returns the mean (and
    writes it into `tensor` when `inplace`), or a handle with `.wait()` when
    `async_op`. The bytes this rank sends are `packed_bytes(tensor.numel(), block_size)`.
    """
    packed = quantize(tensor, fmt, block_size)
    payload = torch.cat([packed.codes, packed.scales.view(torch.uint8)])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    work = dist.all_gather(gathered, payload, group=group, async_op=async_op)
    pending = _Pending(work if async_op else None, gathered, packed, world, tensor if inplace else None)
    return pending if async_op else pending.wait()


__all__ = ["FORMATS", "GRIDS", "Packed", "dequantize", "error_bound", "grid", "packed_bytes", "quantize",
           "quantized_all_reduce"]
