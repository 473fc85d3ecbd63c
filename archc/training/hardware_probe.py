"""`archc plan --hardware local`: this machine's matmul peak and memory bandwidth, measured at start-up.

The peak is `perf.matmul_peak_flops` (the denominator of archc's MFU) in the plan's dtype. The bandwidth
is that of an elementwise product `a * b` whose result is a fresh tensor, 3 x 64 MiB moved per call:
what an unfused op of a training step sees (on a CPU that includes faulting in the new pages; on a GPU
the arrays are larger than its L2 cache, so it is HBM bandwidth).
"""

from __future__ import annotations

import os

import torch

from archc.compiler.hardware import Hardware
from archc.training.perf import matmul_peak_flops, time_fn

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@torch.no_grad()
def elementwise_bandwidth(dtype: torch.dtype = torch.float32, device="cpu", nbytes: int = 64 << 20) -> float:
    """Bytes/s moved by `a * b` into a new tensor (two reads, one write of `nbytes` each), median of 10."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, generator=g, device=device).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype)
    return 3 * nbytes / time_fn(lambda: a * b, warmup=2, iters=10, device=device)


def matmul_side(dtype: torch.dtype, device) -> int:
    """Side of the square matmul whose rate is taken as the peak: 8192 on CUDA; on a CPU 1024
    (512 for 16-bit dtypes, which CPUs without native support run far slower)."""
    if torch.device(device).type == "cuda":
        return 8192
    return 1024 if dtype == torch.float32 else 512


def local_hardware(dtype: str, device, peak: float, bandwidth: float) -> Hardware:
    """This machine as a one-device `Hardware` with the given measured peak (FLOP/s) and bandwidth (B/s)."""
    dev = torch.device(device)
    title = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"this CPU, {torch.get_num_threads()} threads"
    n = matmul_side(TORCH_DTYPES[dtype], dev)
    note = (f"measured: {n}x{n} {dtype} matmul {peak / 1e9:,.1f} GFLOP/s, elementwise a*b into a new "
            f"tensor {bandwidth / 1e9:,.1f} GB/s")
    return Hardware(name="local", title=title, flops={dtype: peak}, hbm_bytes=_device_memory(dev),
                    hbm_bw=bandwidth, intra_bw=0.0, inter_bw=0.0, devices_per_node=1, triton=dev.type == "cuda",
                    note=note)


def measure(dtype: str = "fp32", device: str | None = None, seconds: float = 0.5) -> Hardware:
    """This machine as a one-device `Hardware`, measured now in `dtype` (fp32, bf16 or fp16)."""
    if dtype not in TORCH_DTYPES:
        from archc.dsl.diagnostics import SpecError

        raise SpecError(f"--dtype {dtype}: --hardware local measures {', '.join(TORCH_DTYPES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = TORCH_DTYPES[dtype]
    peak = matmul_peak_flops(torch_dtype, n=matmul_side(torch_dtype, dev), device=dev, seconds=seconds)
    return local_hardware(dtype, dev, peak, elementwise_bandwidth(torch_dtype, dev))
