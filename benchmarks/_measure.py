"""Timing helpers for the benchmarks: a re-export of `archc.training.perf`, where the code lives
(training measures its MFU with the same `matmul_peak_flops`), and the command-line pieces every
kernel benchmark (mixers, sliding_window, attention) shares."""

import argparse

import torch

from archc.training.perf import matmul_peak_flops, synchronize, time_fn

__all__ = ["matmul_peak_flops", "time_fn", "synchronize", "DTYPES", "add_device_args", "device_and_dtype",
           "print_skipped"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared, busy machine")


def device_and_dtype(args) -> tuple[torch.device, torch.dtype] | None:
    """Apply --threads; the device and dtype asked for, or None (after saying so) when CUDA is asked for and absent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here")
        return None
    return device, DTYPES[args.dtype]


def print_skipped(skipped: list[str]) -> None:
    for line in skipped:
        print(f"skipped: {line}")
