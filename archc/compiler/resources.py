"""Refusing to build what this machine cannot hold: memory free on a device, and the error that says so.

A spec parameter set to 10**12, or a config.json asking for terabytes, would otherwise allocate until the
kernel's OOM killer ends the process (or another one). `Compiled.build()` and the trainer compare their
estimates (lower bounds: weights, and for training gradients, optimizer state and kept activations) with
what is free, before allocating anything, and stop with the estimate in the message; every command that
builds a model takes `--no-memory-check` to try anyway.

Free memory: on the CPU, the smallest of the kernel's MemAvailable (/proc/meminfo: free memory plus what
can be reclaimed without swapping) and the room left under a cgroup v2 memory limit; elsewhere
`os.sysconf` free pages. On a CUDA device, `torch.cuda.mem_get_info`.
"""

from __future__ import annotations

import os
from pathlib import Path

NO_CHECK = "--no-memory-check"


class ResourceError(Exception):
    """A model or run larger than the memory this machine has free: one line with the estimate and the way
    out."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_bytes(device=None) -> tuple[int, str] | None:
    """(bytes free on `device` (None or "cpu": main memory), where the number comes from), or None when
    this platform does not say."""
    kind = str(device) if device is not None else "cpu"
    if kind.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(kind))
        return free, f"free on {kind} (torch.cuda.mem_get_info)"
    if not kind.startswith("cpu"):
        return None
    found = [found for found in (_meminfo(), _cgroup_room()) if found is not None]
    if not found:
        try:
            found = [(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages (sysconf)")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _meminfo() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> tuple[int, str] | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text().strip())
        return max(0, int(limit) - used), "room under the cgroup's memory.max"
    except (OSError, ValueError):
        return None


def check_fits(need: float, what: str, parts: str, device=None, fix: str = "") -> None:
    """Raise ResourceError when `need` bytes (`what`: "building the model", with `parts` saying how it was
    counted) exceed what `device` has free. `fix` says what to change; --no-memory-check is always offered."""
    free = available_bytes(device)
    if free is None or need <= free[0]:
        return
    way_out = f"{fix}, or pass {NO_CHECK} to try anyway" if fix else f"pass {NO_CHECK} to try anyway"
    raise ResourceError(f"{what} needs at least {human_bytes(need)} ({parts}), but this machine has "
                        f"{human_bytes(free[0])} free ({free[1]}); {way_out}")
