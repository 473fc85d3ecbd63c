"""Starting N gloo processes on this machine, or joining the group torchrun set up.

`spawn(fn, nproc, *args)` runs `fn(rank, world, *args)` in `nproc` processes
(torch.multiprocessing, spawn start method) after `init_process_group("gloo")`
on 127.0.0.1 with a free port; rank 0's return value comes back through a
file. Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment)
`init()` uses its env:// rendezvous instead and nothing is spawned.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int | None = None, world: int | None = None, port: int | None = None) -> tuple[int, int]:
    """Join (or create) the default gloo process group; returns (rank, world)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if rank is None:  # torchrun
        dist.init_process_group("gloo", init_method="env://")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, world: int, port: int, result_file: str, threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    init(rank, world, port)
    try:
        out = fn(rank, world, *args)
        if rank == 0:
            Path(result_file).write_bytes(pickle.dumps(("ok", out)))
    except BaseException as err:
        if rank == 0 or not Path(result_file).exists():
            Path(result_file + f".{rank}").write_bytes(pickle.dumps(("error", err, traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args: Any, threads: int | None = None) -> Any:
    """Run fn(rank, world, *args) on nproc gloo processes; returns rank 0's result.

    `fn` must be importable (module level) since processes are started with `spawn`.
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        try:
            mp.start_processes(_entry, args=(nproc, free_port(), result_file, threads, fn, args), nprocs=nproc,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException as err:
            for r in range(nproc):
                f = Path(result_file + f".{r}")
                if f.exists():
                    _, original, _tb = pickle.loads(f.read_bytes())
                    raise original from err
            raise
        return pickle.loads(Path(result_file).read_bytes())[1]
