"""Timing helpers: the measured matmul peak (the denominator of MFU) and median timings.

All timings are wall-clock (`time.perf_counter`) medians, taken after warmup.
On CUDA every timed region is bracketed by `torch.cuda.synchronize()` so the
time covers the queued GPU work, not just the kernel launches.
"""

import statistics
import time

import torch

__all__ = ["matmul_peak_flops", "time_fn", "synchronize"]


def synchronize(device="cpu"):
    """Wait for all queued work on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, warmup=3, iters=10, device="cpu"):
    """Median wall-clock seconds of one call `fn()`, after `warmup` untimed calls.

    Each of the `iters` calls is timed on its own, synchronizing `device`
    before and after, so the result includes all GPU work `fn` launched.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def matmul_peak_flops(dtype=torch.float32, n=1024, device="cpu", seconds=1.0):
    """Measured FLOP/s of an `n x n @ n x n` matmul in `dtype` on `device`.

    Counts 2*n**3 FLOPs per matmul. After a short warmup, runs timed repeats
    (each a small batch of back-to-back matmuls, to amortise timer and sync
    overhead) for about `seconds` and returns the FLOP rate of the median
    repeat. This is the practical peak a well-shaped matmul reaches here,
    used as the denominator of MFU-style numbers in the benchmarks.
    """
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run_batch(k):
        for _ in range(k):
            torch.matmul(a, b.t(), out=out)  # the layout of x @ W.T in linear layers (much faster in bf16 on CPU)

    # Warm up (kernel selection, caches, clocks) and size the batch to ~1/20 of the budget.
    per_call = time_fn(lambda: run_batch(1), warmup=3, iters=3, device=device)
    batch = max(1, int(seconds / 20 / max(per_call, 1e-9)))

    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        synchronize(device)
        t0 = time.perf_counter()
        run_batch(batch)
        synchronize(device)
        times.append((time.perf_counter() - t0) / batch)
    return 2 * n**3 / statistics.median(times)
