"""4-bit outer gradients: error bound, exact grid values, 1/8 packed size, all-reduce over gloo."""

from __future__ import annotations

import pytest
import torch

from archc.training.distributed import fp4
from archc.training.distributed.launch import spawn


@pytest.mark.parametrize("fmt", fp4.FORMATS)
@pytest.mark.parametrize("block_size", [None, 32])
def test_error_is_within_half_the_grid_gap_times_the_scale(fmt, block_size):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 0, 1000)
    back = fp4.dequantize(fp4.quantize(x, fmt, block_size))
    bound = fp4.error_bound(x, fmt, block_size)
    assert ((back - x).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    # the bound is tight: some errors come within 20% of it
    assert ((back - x).abs() > 0.8 * bound).any()


@pytest.mark.parametrize("fmt", fp4.FORMATS)
def test_grid_values_come_back_exactly(fmt):
    g = torch.tensor(fp4.GRIDS[fmt])
    for k in (1.0, 0.75, 2.0 ** -10, 3.0):  # scales that amax / grid[-1] gives exactly
        x = torch.cat([g, -g[1:]]) * k
        assert torch.equal(fp4.dequantize(fp4.quantize(x, fmt)), x)
    x = torch.cat([g, -g]).repeat(4) * 0.5
    assert torch.equal(fp4.dequantize(fp4.quantize(x, fmt, block_size=16)), x)


def test_packed_size_is_an_eighth_of_fp32_plus_scales():
    x = torch.randn(4096)
    p = fp4.quantize(x, "e3m0")
    assert p.codes.dtype == torch.uint8 and p.codes.numel() == x.numel() * 4 // 8
    assert p.nbytes == x.numel() * 4 // 8 + 4 == fp4.packed_bytes(4096)
    p = fp4.quantize(torch.randn(4097), "e2m1", block_size=64)
    assert p.codes.numel() == 2049 and p.scales.numel() == 65 and p.nbytes == fp4.packed_bytes(4097, 64)


def test_zeros_and_unknown_format():
    assert torch.equal(fp4.dequantize(fp4.quantize(torch.zeros(7))), torch.zeros(7))
    with pytest.raises(ValueError, match="did you mean `e2m1`"):
        fp4.quantize(torch.ones(2), "e2m2")


def _all_reduce_worker(rank, world):
    return {fmt: _all_reduce_one(rank, world, fmt) for fmt in fp4.FORMATS}


def _all_reduce_one(rank, world, fmt):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(rank))
    mean = fp4.quantized_all_reduce(x.clone(), fmt=fmt, block_size=None)
    expected = sum(fp4.dequantize(fp4.quantize(torch.randn(3, 50, generator=torch.Generator().manual_seed(r)),
                                               fmt)) for r in range(world)) / world
    handle = fp4.quantized_all_reduce(x.clone(), fmt=fmt, async_op=True, inplace=False)
    again = handle.wait()
    import torch.distributed as dist
    others = [torch.empty_like(mean) for _ in range(world)]
    dist.all_gather(others, mean)
    return mean, expected, again, others


@pytest.mark.slow
def test_quantized_all_reduce_on_two_processes_is_the_mean_of_dequantised_inputs():
    for _fmt, (mean, expected, again, others) in spawn(_all_reduce_worker, 2).items():
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-7)
        assert torch.equal(again, mean)
        assert torch.equal(others[0], others[1])  # every rank holds the same bits
