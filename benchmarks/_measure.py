"""Timing helpers for the benchmarks: a re-export of `archc.runtime.perf`, where the code lives
(training measures its MFU with the same `matmul_peak_flops`)."""

from archc.runtime.perf import matmul_peak_flops, synchronize, time_fn

__all__ = ["matmul_peak_flops", "time_fn", "synchronize"]
